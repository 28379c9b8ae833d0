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


def channels_last(module: "torch.nn.Module", device: "torch.device") -> "torch.nn.Module":
    """On CUDA, store the module's 4-D weights channels-last (in place) and return it.

    cuDNN runs convolutions fastest on NHWC tensors; a convolution whose weight is channels-last also gives a
    channels-last output, so a CNN stays in that layout without the inputs being converted. The results are
    the same up to floating-point order. For a ViT only the patch embedding is affected. On the CPU the
    module is returned unchanged.
    """
    if device.type == "cuda":
        import torch

        module.to(memory_format=torch.channels_last)
    return module
