"""histobench's core analyses (``histobench analyze NAME``), registered in :mod:`histobench.builtin`.

They live in the core because every method shares them: ``attention`` (:mod:`.attention`; the sparsity of a ViT's
last-block [CLS] attention, DiRL's question, for any ViT encoder) and ``cka`` (:mod:`.cka_analysis`; layer-wise
centered kernel alignment between two encoders, HistoTransfer's question).
"""
