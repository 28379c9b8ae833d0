"""An example histobench plugin: a max-pooling aggregator and a ``hello`` command."""

from histobench import hookimpl
from histobench_example.maxpool import MaxPool


@hookimpl
def register_aggregators(register):
    register(MaxPool)


@hookimpl
def register_commands(app):
    @app.command("example-hello")
    def hello() -> None:
        """Say which plugin is speaking."""
        print("hello from histobench-example")
