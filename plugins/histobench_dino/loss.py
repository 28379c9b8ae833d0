"""DINO's loss, now a core part: :mod:`histobench.ssl.losses` (re-exported here for old imports)."""

from histobench.ssl.losses import DINOLoss

__all__ = ["DINOLoss"]
