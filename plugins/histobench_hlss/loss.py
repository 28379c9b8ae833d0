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


def symmetric_kl(z: "torch.Tensor", t: "torch.Tensor") -> "torch.Tensor":
    """Per row ``½ [KL(softmax z ‖ softmax t) + KL(softmax t ‖ softmax z)]`` over the feature coordinates."""
    import torch

    lp, lq = torch.log_softmax(z.float(), dim=1), torch.log_softmax(t.float(), dim=1)
    p, q = lp.exp(), lq.exp()
    return 0.5 * ((p * (lp - lq)).sum(1) + (q * (lq - lp)).sum(1))


def alignment_kl(u: "torch.Tensor", bank: "torch.Tensor", gradient: bool = True) -> tuple["torch.Tensor", "torch.Tensor"]:
    """HA for one level: ``(sum over views of the symmetric KL to the nearest attribute, chosen indices)``."""
    idx = nearest_attribute(u, bank)
    kl = symmetric_kl(u, bank[idx].to(u.dtype)).sum()
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
              lambdas: dict[str, float] | None = None, ha_weight: float = 1.0, ha_gradient: bool = True) -> dict:
    """The HLSS objective on (already gathered) rows in ``[B, S, P, T]`` order.

    ``u`` ``[N, D_t]`` are the embeddings in the text space (the backbone's ``z``, or the adapter's output),
    ``heads[level]`` ``[N, K_level]`` the L2-normalised head outputs, ``banks[level]`` the frozen text banks.
    Returns ``loss`` (``L_HVC + ha_weight * L_HA``) and the detached terms ``patch``, ``slide``, ``patient``,
    ``hvc``, ``ha_patch``, ``ha_slide``, ``ha_patient``, ``ha``.
    """
    lambdas = lambdas or {lvl: 1.0 for lvl in LEVELS}
    out: dict = {}
    hvc = 0.0
    for lvl in LEVELS:
        term = supcon_loss(group(heads[lvl], lvl, shape), tau, base_tau)
        out[lvl] = term.detach()
        hvc = hvc + lambdas[lvl] * term
    ha = 0.0
    for lvl in LEVELS:
        kl, _ = alignment_kl(u, banks[lvl], gradient=ha_gradient)
        out[f"ha_{lvl}"] = kl.detach()
        ha = ha + kl
    out["hvc"] = hvc.detach()
    out["ha"] = ha.detach()
    out["loss"] = hvc + ha_weight * ha
    return out
