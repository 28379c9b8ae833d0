"""Choosing the torch device: the one rule every stage (training, extraction, evaluation) follows."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


def resolve_device(name: str | None = None) -> "torch.device":
    """``None`` or ``auto`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
