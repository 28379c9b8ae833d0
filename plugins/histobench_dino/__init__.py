"""histobench-dino: DINO self-distillation (Caron et al., ICCV 2021)."""

from histobench import hookimpl
from histobench_dino.pretext import DINO


@hookimpl
def register_pretexts(register):
    register(DINO)
