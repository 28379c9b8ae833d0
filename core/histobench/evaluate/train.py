"""The one training loop for slide-level heads (aggregators) and their batched prediction.

Bags are ``[N_i, D]`` numpy arrays of tile embeddings. A mini-batch pads its bags to the longest one (after
capping each training bag at ``max_tiles`` randomly sampled tiles) and passes a boolean mask, True on real
tiles, to the module: ``module(x [B, N, D], mask [B, N]) -> (out [B, K], attention [B, N] or None)``.

The loss is a name in :data:`LOSSES` or a callable ``loss(out [B, K], target [B, ...]) -> scalar``, so
survival losses (discrete-time NLL, Cox) slot in without changing the loop; the targets of a callable loss
reach it as a float tensor of ``targets[batch]``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from histobench.device import resolve_device

from histobench.evaluate.options import EvalOptions
from histobench.faults import fault_point
from histobench.pretrain.schedules import cosine_schedule

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

LossFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


def class_weights(targets: np.ndarray, n_classes: int, mode: str = "balanced") -> np.ndarray:
    """``n / (C_present * n_c)`` for the classes present (absent classes get 0); all ones for ``none``."""
    if mode == "none":
        return np.ones(n_classes, dtype=np.float32)
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes, dtype=np.float64)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w.astype(np.float32)


def _cross_entropy(weight: "torch.Tensor | None") -> LossFn:
    import torch.nn.functional as F

    def loss(out: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":
        return F.cross_entropy(out, target.long(), weight=weight)

    return loss


LOSSES: dict[str, str] = {"ce": "class-weighted cross-entropy over logits (classification)"}
"""Built-in loss names; anything else is passed as a callable."""


def pad_bags(
    bags: Sequence["torch.Tensor"], cap: int | None = None, rng: np.random.Generator | None = None
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Stack bags ``[N_i, D]`` into ``x [B, N_max, D]`` (zeros after each bag) and ``mask [B, N_max]``.

    With ``cap``, a bag longer than ``cap`` is replaced by ``cap`` of its tiles drawn without replacement by
    ``rng`` (kept in their original order).
    """
    import torch

    if cap is not None:
        if rng is None:
            raise ValueError("pad_bags needs an rng to sample tiles under a cap")
        bags = [b[torch.from_numpy(np.sort(rng.choice(len(b), cap, replace=False)))] if len(b) > cap else b for b in bags]
    lengths = [len(b) for b in bags]
    n_max = max(lengths)
    dim = bags[0].shape[1]
    x = bags[0].new_zeros((len(bags), n_max, dim))
    mask = torch.zeros((len(bags), n_max), dtype=torch.bool, device=bags[0].device)
    for i, (b, n) in enumerate(zip(bags, lengths)):
        x[i, :n] = b
        mask[i, :n] = True
    return x, mask


def _as_tensors(bags: Sequence[np.ndarray]) -> list["torch.Tensor"]:
    import torch

    out = []
    for i, b in enumerate(bags):
        a = np.asarray(b, dtype=np.float32)
        if a.ndim != 2 or len(a) == 0:
            raise ValueError(f"bag {i} must be a non-empty [N, D] array, got shape {a.shape}")
        out.append(torch.from_numpy(np.ascontiguousarray(a)))
    return out


def _param_groups(module: "nn.Module", weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fit_aggregator(
    module: "nn.Module",
    bags: Sequence[np.ndarray],
    targets: np.ndarray,
    opts: EvalOptions,
    *,
    n_outputs: int,
    loss: str | LossFn = "ce",
    log: Callable[[int, float], None] | None = None,
) -> "nn.Module":
    """Train ``module`` on ``bags`` with the one policy in ``opts``; returns it (moved to the device, eval mode).

    Per epoch the bags are shuffled and cut into batches of ``opts.batch_size``; each training bag is capped
    at ``opts.max_tiles`` random tiles; AdamW with cosine decay, per step. Everything random (batch order,
    tile sampling, dropout) is drawn from ``opts.seed``, and the global torch RNG is left as it was.
    ``log(epoch, mean_loss)`` is called after each epoch.
    """
    import torch

    if len(bags) != len(targets):
        raise ValueError(f"{len(bags)} bags but {len(targets)} targets")
    if len(bags) == 0:
        raise ValueError("no training bags")
    device = resolve_device(opts.device)
    data = _as_tensors(bags)
    targets = np.array(targets)  # a writable copy (pandas hands out read-only views)
    if loss == "ce":
        weight = torch.from_numpy(class_weights(targets, n_outputs, opts.class_weighting)).to(device)
        loss_fn: LossFn = _cross_entropy(weight)
        target_t = torch.as_tensor(targets, dtype=torch.long)
    elif callable(loss):
        loss_fn = loss
        target_t = torch.as_tensor(targets, dtype=torch.float32)
    else:
        raise ValueError(f"unknown loss {loss!r}; built-in losses: {', '.join(LOSSES)} (or pass a callable)")

    rng = np.random.default_rng(opts.seed)
    steps_per_epoch = math.ceil(len(data) / opts.batch_size)
    lrs = cosine_schedule(opts.lr, 0.0, opts.epochs * steps_per_epoch)
    module.to(device)
    optimizer = torch.optim.AdamW(_param_groups(module, opts.weight_decay), lr=opts.lr)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(opts.seed)
        module.train()
        step = 0
        for epoch in range(opts.epochs):
            order = rng.permutation(len(data))
            total = 0.0
            for b in range(steps_per_epoch):
                idx = order[b * opts.batch_size : (b + 1) * opts.batch_size]
                x, mask = pad_bags([data[i] for i in idx], cap=opts.max_tiles, rng=rng)
                x, mask = x.to(device, non_blocking=True), mask.to(device, non_blocking=True)
                for group in optimizer.param_groups:
                    group["lr"] = float(lrs[step])
                out, _ = module(x, mask)
                value = loss_fn(out, target_t[torch.from_numpy(idx)].to(device))
                if not torch.isfinite(value):
                    raise FloatingPointError(f"non-finite training loss at epoch {epoch}, step {step}")
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                total += float(value.detach()) * len(idx)
                step += 1
            if log is not None:
                log(epoch, total / len(data))
            fault_point("evaluate.epoch")  # histobench.faults: the fault suite's "kill mid-fold"
    module.eval()
    return module


def predict(
    module: "nn.Module", bags: Sequence[np.ndarray], *, batch_size: int = 8, device: str | None = None
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Outputs ``[len(bags), K]`` and per-bag attention (``[N_i]`` or ``None``) in eval mode, all tiles used.

    Bags are batched by similar length (to keep padding small) and returned in their input order.
    ``device`` defaults to the module's own.
    """
    import torch

    if len(bags) == 0:
        return np.zeros((0, 0), dtype=np.float32), []
    data = _as_tensors(bags)
    dev = torch.device(device) if device is not None else next(module.parameters()).device
    module.to(dev)
    module.eval()
    order = np.argsort([len(b) for b in data], kind="mergesort")
    outputs: list[np.ndarray | None] = [None] * len(data)
    attention: list[np.ndarray | None] = [None] * len(data)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x, mask = pad_bags([data[i] for i in idx])
            out, att = module(x.to(dev), mask.to(dev))
            out = out.float().cpu().numpy()
            att = att.float().cpu().numpy() if att is not None else None
            for row, i in enumerate(idx):
                outputs[i] = out[row]
                if att is not None:
                    attention[i] = att[row, : len(data[i])].copy()
    return np.stack(outputs), attention  # type: ignore[arg-type]
