"""histobench-hlss: HLSS, hierarchical language-tied self-supervision (Watawana et al., MICCAI 2024, arXiv
2403.14616): text encoders, task descriptions and the HLSS pretext. Hookimpls and imports only."""

from histobench import hookimpl  # noqa: F401  (the hookimpls are added as the plugin's parts land)
