"""DiRL-R's prior-guided dense term (spec ``shared/methods/dirl.md`` §2.5-2.6; Kapse et al., arXiv 2309.06439;
DetCon-style mask pooling, Hénaff et al., ICCV 2021).

For view ``v`` and group ``k``, with token occupancy ``A_v[k, t]`` (:func:`histobench_dirl.views.occupancy`)
and patch tokens ``h_v[t]``:

    z_{v,k} = Σ_t A_v[k,t] h_{v,t} / (Σ_t A_v[k,t] + ε),   m_{v,k} = Σ_t A_v[k,t]   (mass, in tokens).

Group ``k`` is valid for the pair of global views ``(i, j)`` when ``m_{i,k} ≥ a_min`` and ``m_{j,k} ≥ a_min``.
The dense loss is DINO's cross-entropy between the teacher's centred, sharpened distribution of
``g_d'(z'_{i,k})`` and the student's of ``g_d(z_{j,k})``, summed over valid (pair, sample, group) terms with
``i ≠ j`` and divided by their count (not by K). Its centre ``c_d`` is its own: an EMA of the teacher's dense
logits of the groups that enter a valid term. The total is ``L = L_img + λ L_dense``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from histobench.ssl.losses import DINOLoss


def pool_groups(tokens: torch.Tensor, occ: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z [B, K, D], mass [B, K])``: occupancy-weighted means of ``tokens [B, N, D]`` for ``occ [B, K, N]``."""
    mass = occ.sum(-1)
    z = torch.einsum("bkn,bnd->bkd", occ.to(tokens.dtype), tokens) / (mass.unsqueeze(-1).to(tokens.dtype) + eps)
    return z, mass


def valid_pairs(masses: Sequence[torch.Tensor], a_min: float) -> dict[tuple[int, int], torch.Tensor]:
    """``{(i, j): valid [B, K] bool}`` for every ordered pair of distinct views ``i != j``."""
    ok = [m >= a_min for m in masses]
    return {(i, j): ok[i] & ok[j] for i in range(len(ok)) for j in range(len(ok)) if i != j}


class DenseLoss(DINOLoss):
    """``forward(student_z, teacher_z, masses, student_head, teacher_head, teacher_temp) -> (loss, stats)``.

    ``student_z``/``teacher_z``: per global view ``[B, K, D]`` pooled group embeddings (student and teacher
    tokens of the same view's masks); ``masses``: per view ``[B, K]``. A DINO loss (:class:`DINOLoss`) with its
    own centre over ``out_dim``. ``stats``: ``valid_terms`` (the number of valid (pair, sample, group) terms),
    ``valid_groups`` (their mean per (pair, sample)) and ``teacher_entropy`` of the dense targets.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, a_min: float = 1.0):
        super().__init__(out_dim, student_temp, center_momentum)
        self.a_min = a_min

    def forward(self, student_z, teacher_z, masses, student_head, teacher_head, teacher_temp):  # type: ignore[override]
        import torch.nn.functional as F

        n_views = len(student_z)
        pairs = valid_pairs(masses, self.a_min)
        b = masses[0].shape[0]
        count = sum(int(v.sum()) for v in pairs.values())
        stats = {"valid_terms": float(count), "valid_groups": count / max(len(pairs) * b, 1)}
        zero = student_z[0].sum() * 0.0
        if count == 0:  # no group big enough in two views: no term, no NaN, the centre stays
            self.update_center([])  # (still joins the other ranks' reduction)
            return zero, {**stats, "teacher_entropy": zero.detach()}
        # every (view, sample, group) that enters a term as teacher target i or as student j
        used_t = [torch.zeros_like(masses[0], dtype=torch.bool) for _ in range(n_views)]
        used_s = [torch.zeros_like(masses[0], dtype=torch.bool) for _ in range(n_views)]
        for (i, j), v in pairs.items():
            used_t[i] |= v
            used_s[j] |= v
        with torch.no_grad():
            t_logits = [teacher_head(teacher_z[i][used_t[i]]) for i in range(n_views)]
        s_logits = [student_head(student_z[j][used_s[j]]) for j in range(n_views)]
        t_logits = [t.detach().float() for t in t_logits]
        probs = [F.softmax((t - self.center) / teacher_temp, dim=-1) for t in t_logits]
        log_s = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in s_logits]
        # position of each (sample, group) in the compacted rows of its view
        t_pos = [torch.cumsum(u.flatten(), 0).view_as(u) - 1 for u in used_t]
        s_pos = [torch.cumsum(u.flatten(), 0).view_as(u) - 1 for u in used_s]
        total = zero
        for (i, j), v in pairs.items():
            if not v.any():
                continue
            p = probs[i][t_pos[i][v]]
            ls = log_s[j][s_pos[j][v]]
            total = total + (-(p * ls).sum(-1)).sum()
        loss = total / count
        with torch.no_grad():
            entropy = torch.cat([-(p * torch.log(p.clamp_min(1e-12))).sum(-1) for p in probs]).mean()
        self.update_center([t for t in t_logits if len(t)])
        return loss, {**stats, "teacher_entropy": entropy}

    @torch.no_grad()
    def update_center(self, teacher_outputs: Sequence[torch.Tensor]) -> None:
        """The centre's EMA over this step's valid teacher group logits (summed over ranks under DDP); a step
        with none anywhere leaves it unchanged."""
        t = torch.cat([o.float() for o in teacher_outputs]) if teacher_outputs else self.center.new_zeros(0, self.center.shape[1])
        batch_sum = t.sum(0, keepdim=True)
        count = torch.tensor(float(t.shape[0]), device=self.center.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_sum)
            torch.distributed.all_reduce(count)
        if float(count) > 0:
            self.center.mul_(self.center_momentum).add_(batch_sum / count * (1 - self.center_momentum))
