"""A ViT's last-block [CLS]→patch attention, recomputed from the block's ``qkv`` projection.

DINO's attention maps (Caron et al., ICCV 2021, arXiv:2104.14294, Sec. 4.2.1, Fig. 1) and the attention-
sparsity analyses built on them (DiRL, spec ``dirl.md`` §4.4) read the [CLS] query's softmax over the keys
of the last transformer block, one row per head. timm's ``Attention`` runs fused scaled-dot-product
attention, which returns no weights; instead of switching fusion off (a per-module flag or a global
setting), :func:`vit_cls_attention` records the last block's attention input with a forward pre-hook
during an ordinary forward and recomputes ``softmax(q_cls kᵀ · scale)`` from that block's ``qkv`` projection,
with its ``q_norm``/``k_norm`` when it has them. The hook is removed afterwards.

The softmax runs over every key (class, register and patch tokens), as in the network; then the class and
register entries are dropped and each head's row is renormalised to sum to 1 over the patches (registers:
Darcet et al., "Vision Transformers Need Registers", ICLR 2024, which attract the [CLS] attention that would
otherwise land on a few patches).

Works on any module shaped like timm's ``VisionTransformer``: ``blocks[-1].attn`` with ``qkv`` (a linear
layer to ``3 * heads * head_dim``) and ``num_heads``; prefix tokens first, their count in
``num_prefix_tokens``; a class token (``has_class_token`` or ``cls_token``). HIPT's region ViT qualifies.
Dropout and stochastic depth are not applied to the recomputed weights; call it in ``eval()`` mode so that the
last block's input is deterministic too. Gradients flow if the caller's grad mode allows them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from histobench.errors import HistobenchError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


def _last_attention(model: "nn.Module", name: str) -> "nn.Module":
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise HistobenchError(f"{name} has no transformer blocks: [CLS] attention needs a ViT")
    attn = getattr(blocks[-1], "attn", None)
    if attn is None or not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
        raise HistobenchError(f"{name}'s last block has no attention with a fused qkv projection: "
                              f"[CLS] attention is not supported for it")
    return attn


def _has_class_token(model: "nn.Module") -> bool:
    flag = getattr(model, "has_class_token", None)
    return bool(flag) if flag is not None else getattr(model, "cls_token", None) is not None


def vit_cls_attention(model: "nn.Module", x: "torch.Tensor", forward: Callable[[Any], Any] | None = None,
                      name: str | None = None) -> "torch.Tensor":
    """``[B, heads, N_patches]``: the last block's [CLS]→patch attention per head, each row summing to 1.

    Args:
        model: A ViT-like module (see the module docstring).
        x: Its input batch.
        forward: What to run to reach the last block (default: ``model.forward_features`` if it has one,
            else ``model`` itself).
        name: The architecture's name for error messages (default: the class name).

    Raises:
        HistobenchError: ``model`` has no transformer blocks, no ``qkv`` attention or no class token.
    """
    import torch

    name = name or type(model).__name__
    attn = _last_attention(model, name)
    if not _has_class_token(model):
        raise HistobenchError(f"{name} has no [CLS] token: [CLS] attention needs one")
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    captured: list[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        (forward or getattr(model, "forward_features", model))(x)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise HistobenchError(f"{name}'s last attention ran {len(captured)} times in one forward; expected once")
    tokens = captured[0]  # [B, T, C]: the block's normed input
    b, t, _ = tokens.shape
    heads = int(attn.num_heads)
    head_dim = int(getattr(attn, "head_dim", attn.qkv.out_features // (3 * heads)))
    scale = float(getattr(attn, "scale", head_dim ** -0.5))
    qkv = attn.qkv(tokens).reshape(b, t, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # [3, B, heads, T, hd]
    q, k = qkv[0][:, :, :1], qkv[1]
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q)
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    logits = (q.float() * scale) @ k.float().transpose(-2, -1)  # [B, heads, 1, T]
    weights = logits.softmax(dim=-1)[:, :, 0, prefix:]
    return weights / weights.sum(dim=-1, keepdim=True)
