"""DINO's self-distillation loss (Caron et al., ICCV 2021, arXiv:2104.14294, Sec. 3.1, Eq. 1-2, Algorithm 1).

For teacher outputs ``t`` on the global views and student outputs ``s`` on all views, the teacher
distribution is ``P_t = softmax((t - c) / tau_t)`` (centred and sharpened) and the student's
``log P_s = log_softmax(s / tau_s)``; the loss averages ``-sum_k P_t log P_s`` over the batch and over every
(teacher view ``i``, student view ``j``) pair with ``i != j``. The centre ``c`` is an exponential moving
average (momentum 0.9) of the teacher's batch-mean output, averaged over ranks when ``torch.distributed``
is initialised; it is updated after the loss is computed. Centring stops one dimension from dominating,
sharpening stops the uniform collapse. The teacher temperature is passed per call (the pretext owns its
warm-up schedule). SLPD's prototype distillation subclasses it with other targets
(:mod:`histobench_slpd.loss`), and a dense term (DiRL) can reuse it with a centre of its own.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DINOLoss(nn.Module):
    """``forward(student_outputs, teacher_outputs, teacher_temp) -> (loss, {"teacher_entropy": ...})``.

    Args:
        out_dim: Output width ``K`` of the heads.
        student_temp: Student softmax temperature (paper: 0.1).
        center_momentum: EMA momentum of the centre (paper: 0.9).

    ``student_outputs`` is a list of ``[B, K]`` logits, one per view, the global views first, in the same
    order as ``teacher_outputs`` (one per global view).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probs(self, teacher_outputs: Sequence[torch.Tensor], teacher_temp: float) -> list[torch.Tensor]:
        return [F.softmax((t.float() - self.center) / teacher_temp, dim=-1) for t in teacher_outputs]

    def cross_entropy(self, probs: Sequence[torch.Tensor], student_outputs: Sequence[torch.Tensor],
                      skip_same_view: bool = True) -> torch.Tensor:
        """Mean cross-entropy of every (target ``i``, student view ``j``) pair; ``i == j`` skipped if asked."""
        log_s = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_outputs]
        total, terms = 0.0, 0
        for i, p in enumerate(probs):
            for j, ls in enumerate(log_s):
                if skip_same_view and i == j:  # never the same view for teacher and student
                    continue
                total = total + (-(p * ls).sum(-1)).mean()
                terms += 1
        return total / max(terms, 1)

    def forward(self, student_outputs: Sequence[torch.Tensor], teacher_outputs: Sequence[torch.Tensor],
                teacher_temp: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        teacher_outputs = [t.detach() for t in teacher_outputs]
        probs = self.teacher_probs(teacher_outputs, teacher_temp)
        loss = self.cross_entropy(probs, student_outputs)
        with torch.no_grad():
            entropy = torch.stack([-(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean() for p in probs]).mean()
        self.update_center(teacher_outputs)
        return loss, {"teacher_entropy": entropy}

    @torch.no_grad()
    def update_center(self, teacher_outputs: Sequence[torch.Tensor]) -> None:
        t = torch.cat([o.float() for o in teacher_outputs])
        batch_sum = t.sum(0, keepdim=True)
        count = torch.tensor(float(t.shape[0]), device=t.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_sum)
            torch.distributed.all_reduce(count)
        batch_center = batch_sum / count
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
