"""histobench-histotransfer: HistoTransfer (Sharma et al., IEEE BHI 2021, arXiv 2106.07068): histopathology
encoders next to ImageNet ones (KimiaNet, hub foundation models), the paper's attention-pooling aggregator and
the paper's study as one command sequence. Truncation lives in the timm encoder (``-o encoder.truncate_at=``).
Hookimpls and imports only."""

from histobench import hookimpl
from histobench_histotransfer.attention_pool import AttentionPool
from histobench_histotransfer.histology import HistologyEncoder
from histobench_histotransfer.kimianet import KimiaNet


@hookimpl
def register_encoders(register):
    register(KimiaNet)
    register(HistologyEncoder)


@hookimpl
def register_aggregators(register):
    register(AttentionPool)


@hookimpl
def register_commands(app):
    from histobench_histotransfer.study import register_study_command

    register_study_command(app)
