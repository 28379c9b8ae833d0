"""histobench-dirl: DiRL, cell-prior dense pretext for diverse attention (Kapse et al., arXiv 2309.06439), its
nuclei segmenters and the grouping of nuclei into the cell prior. Plugin modules hold hookimpls and imports only."""

from histobench import hookimpl
from histobench_dirl.pretext import DiRL
from histobench_dirl.segmenters import HEDWatershedSegmenter, StarDistSegmenter


@hookimpl
def register_segmenters(register):
    register(HEDWatershedSegmenter)
    register(StarDistSegmenter)


@hookimpl
def register_pretexts(register):
    register(DiRL)
