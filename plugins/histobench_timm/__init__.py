"""histobench-timm: any timm image model as an encoder."""

from histobench import hookimpl
from histobench_timm.encoder import TimmEncoder


@hookimpl
def register_encoders(register):
    register(TimmEncoder)
