"""histobench-slpd: SLPD, slide-level prototypical distillation (Yu et al., MICCAI 2023), and HIPT's region ViT."""

from histobench import hookimpl
from histobench_slpd.encoder import HIPTRegionEncoder
from histobench_slpd.pretext import SLPD


@hookimpl
def register_encoders(register):
    register(HIPTRegionEncoder)


@hookimpl
def register_pretexts(register):
    register(SLPD)
