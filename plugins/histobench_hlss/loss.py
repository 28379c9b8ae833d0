"""HLSS losses: supervised-contrastive terms per hierarchy level and the hierarchical text alignment (HA).

Watawana et al., "Hierarchical Text-to-Vision Self Supervised Alignment for Improved Histopathology
Representation Learning", MICCAI 2024, arXiv:2403.14616 (code: Hasindri/HLSS), on HiDisc's hierarchy (Jiang et
al., CVPR 2023, arXiv:2303.01605). Spec ``/work/shared/methods/hlss.md`` §2.5.

Flat tensors are in ``[B, S, P, T]`` order (patients, slides, tiles, views). A level groups them into ``N``
instances of ``V`` views by a reshape: patch ``[B*S*P, T]``, slide ``[B*S, P*T]``, patient ``[B, S*P*T]``.

* :func:`supcon_loss`: SupCon with identity labels and ``contrast_mode = all`` (Khosla et al., NeurIPS 2020):
  every view is an anchor, its positives are the other views of its instance, its denominator every other view
  of the (global) batch; the loss is scaled by ``tau / base_tau`` (1 at HLSS's 0.07 / 0.07).
* :func:`alignment_kl`: for every view the nearest attribute of the level's frozen text bank (argmax cosine,
  ties to the lowest index), then ``½ [KL(p‖q) + KL(q‖p)]`` between softmaxes over the *feature coordinates*
  of the view's embedding and of that attribute vector, summed over views. With ``gradient=False`` it is the
  released code's value (taken with ``.item()``): logged and added, but no gradient flows.
  The spec's open points (§5 P2, P3) are options, with the released code's choices as defaults:
  ``reduction`` ``sum`` (code: the term grows with the global batch) or ``mean`` (over the matched vectors);
  ``temperature`` of both softmaxes (code: 1); ``match`` ``per_view`` (code: every view is matched, the slide
  and patient terms differ only in the bank searched) or ``group_mean`` (the figure's other reading: each
  level's instance -- a tile's ``T`` views, a slide's ``P*T``, a patient's ``S*P*T`` -- is pooled, the mean of
  its unit views re-normalised [ours], and the pooled vector is matched and aligned once).
* :func:`gather_with_grad`: the all-gather that makes the contrastive batch global under ``torchrun`` (each
  rank computes the loss on the whole batch; gradients flow back to each rank's own slice).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

LEVELS = ("patch", "slide", "patient")


def group(x: "torch.Tensor", level: str, shape: tuple[int, int, int, int]) -> "torch.Tensor":
    """``x`` ``[B*S*P*T, D]`` in ``[B, S, P, T]`` order -> ``[N, V, D]`` for ``level`` (see the module docstring)."""
    b, s, p, t = shape
    n = {"patch": b * s * p, "slide": b * s, "patient": b}[level]
    if x.shape[0] != b * s * p * t:
        raise ValueError(f"{x.shape[0]} rows do not make {b}x{s}x{p}x{t} views")
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])


def group_ids(shape: tuple[int, int, int, int], level: str) -> "torch.Tensor":
    """The instance id of every flat row at ``level`` (what :func:`group` puts together)."""
    import torch

    b, s, p, t = shape
    ids = torch.arange(b * s * p * t).reshape(b, s, p, t)
    if level == "patch":
        return (ids // t).reshape(-1)
    if level == "slide":
        return (ids // (p * t)).reshape(-1)
    return (ids // (s * p * t)).reshape(-1)


def supcon_loss(views: "torch.Tensor", tau: float = 0.07, base_tau: float = 0.07) -> "torch.Tensor":
    """SupCon of ``views`` ``[N, V, D]`` (unit rows), identity labels, every view an anchor (``contrast_mode=all``)."""
    import torch

    n, v, d = views.shape
    f = views.reshape(n * v, d).float()
    labels = torch.arange(n, device=f.device).repeat_interleave(v)
    logits = f @ f.T / tau
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    self_mask = torch.eye(n * v, dtype=torch.bool, device=f.device)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    logits_others = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits_others, dim=1, keepdim=True)
    mean_pos = (log_prob * pos).sum(1) / pos.sum(1).clamp(min=1)
    return -(tau / base_tau) * mean_pos.mean()


def nearest_attribute(u: "torch.Tensor", bank: "torch.Tensor") -> "torch.Tensor":
    """Index of the most cosine-similar bank row for each row of ``u`` (ties: the lowest index)."""
    import torch

    sims = torch.nn.functional.normalize(u.detach().float(), dim=1) @ bank.float().T
    return sims.argmax(dim=1)


def symmetric_kl(z: "torch.Tensor", t: "torch.Tensor", temperature: float = 1.0) -> "torch.Tensor":
    """Per row ``½ [KL(p ‖ q) + KL(q ‖ p)]``, ``p = softmax(z / temperature)``, ``q = softmax(t / temperature)``
    over the feature coordinates."""
    import torch

    lp = torch.log_softmax(z.float() / temperature, dim=1)
    lq = torch.log_softmax(t.float() / temperature, dim=1)
    p, q = lp.exp(), lq.exp()
    return 0.5 * ((p * (lp - lq)).sum(1) + (q * (lq - lp)).sum(1))


def pool_groups(u: "torch.Tensor", level: str, shape: tuple[int, int, int, int]) -> "torch.Tensor":
    """``match = group_mean``: one unit vector per instance of ``level``, the re-normalised mean of its views."""
    import torch

    return torch.nn.functional.normalize(group(u, level, shape).mean(dim=1), dim=1)


def alignment_kl(u: "torch.Tensor", bank: "torch.Tensor", gradient: bool = True, *, reduction: str = "sum",
                 temperature: float = 1.0) -> tuple["torch.Tensor", "torch.Tensor"]:
    """HA for one level: ``(symmetric KL of each row of u to its nearest attribute, summed or averaged; the
    chosen indices)``."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', not {reduction!r}")
    idx = nearest_attribute(u, bank)
    per_row = symmetric_kl(u, bank[idx].to(u.dtype), temperature)
    kl = per_row.sum() if reduction == "sum" else per_row.mean()
    return (kl if gradient else kl.detach()), idx


def gather_with_grad(x: "torch.Tensor") -> "torch.Tensor":
    """All ranks' ``x`` concatenated in rank order, differentiable; ``x`` itself outside a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    import torch

    return torch.cat(all_gather(x.contiguous()), dim=0)


def hlss_loss(u: "torch.Tensor", heads: dict[str, "torch.Tensor"], banks: dict[str, "torch.Tensor"],
              shape: tuple[int, int, int, int], *, tau: float = 0.07, base_tau: float = 0.07,
              lambdas: dict[str, float] | None = None, ha_weight: float = 1.0, ha_gradient: bool = True,
              ha_match: str = "per_view", ha_reduction: str = "sum", ha_temperature: float = 1.0) -> dict:
    """The HLSS objective on (already gathered) rows in ``[B, S, P, T]`` order.

    ``u`` ``[N, D_t]`` are the embeddings in the text space (the backbone's ``z``, or the adapter's output),
    ``heads[level]`` ``[N, K_level]`` the L2-normalised head outputs, ``banks[level]`` the frozen text banks.
    ``ha_match`` (``per_view`` | ``group_mean``), ``ha_reduction`` (``sum`` | ``mean``) and ``ha_temperature``
    shape the alignment term (module docstring). Returns ``loss`` (``L_HVC + ha_weight * L_HA``) and the
    detached terms ``patch``, ``slide``, ``patient``, ``hvc``, ``ha_patch``, ``ha_slide``, ``ha_patient``, ``ha``.
    """
    if ha_match not in ("per_view", "group_mean"):
        raise ValueError(f"ha_match must be 'per_view' or 'group_mean', not {ha_match!r}")
    lambdas = lambdas or {lvl: 1.0 for lvl in LEVELS}
    out: dict = {}
    hvc = 0.0
    for lvl in LEVELS:
        term = supcon_loss(group(heads[lvl], lvl, shape), tau, base_tau)
        out[lvl] = term.detach()
        hvc = hvc + lambdas[lvl] * term
    ha = 0.0
    for lvl in LEVELS:
        rows = u if ha_match == "per_view" else pool_groups(u, lvl, shape)
        kl, _ = alignment_kl(rows, banks[lvl], gradient=ha_gradient, reduction=ha_reduction,
                             temperature=ha_temperature)
        out[f"ha_{lvl}"] = kl.detach()
        ha = ha + kl
    out["hvc"] = hvc.detach()
    out["ha"] = ha.detach()
    out["loss"] = hvc + ha_weight * ha
    return out
