"""histobench-histotransfer: HistoTransfer (Sharma et al., IEEE BHI 2021, arXiv 2106.07068): truncated ImageNet and
histopathology encoders, KimiaNet, the paper's attention-pooling aggregator. Hookimpls and imports only."""

from histobench import hookimpl  # noqa: F401  (the hookimpls are added as the plugin's parts land)
