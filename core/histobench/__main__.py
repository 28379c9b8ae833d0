from histobench.cli.app import main

main()
