"""DINO's projection head, now a core part: :mod:`histobench.ssl.heads` (re-exported here for old imports)."""

from histobench.ssl.heads import BackboneWithHead, DINOProjectionHead

__all__ = ["BackboneWithHead", "DINOProjectionHead"]
