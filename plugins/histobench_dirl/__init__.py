"""histobench-dirl: DiRL, cell-prior dense pretext for diverse attention (Kapse et al., arXiv 2309.06439), its
nuclei segmenters and the grouping of nuclei into the cell prior. Plugin modules hold hookimpls and imports only."""

from histobench import hookimpl  # noqa: F401  (the hookimpls are added as the plugin's parts land)
