"""SLPD's prototype distillation losses (Yu et al., MICCAI 2023, arXiv:2307.10696; code
https://github.com/Carboxy/SLPD; spec ``/work/shared/methods/slpd.md`` section 2.6).

Both terms are DINO cross-entropies (Caron et al., ICCV 2021) whose teacher side is not a teacher view but a
stored prototype pushed through the teacher's *current* last layer, ``u(p) = W_teacher normalise(p)``:

* ``L_intra``: every student view of a region against ``u`` of its own slide prototype ``p_{s, a(r)}``;
* ``L_inter``: every student view against ``u`` of the matching prototype of each of the ``r`` neighbour
  slides, averaged over (neighbour, view) pairs.

The targets are centred and sharpened like DINO's (``softmax((u - c') / tau_t)``, ``tau_t`` 0.04, student
``tau_s`` 0.1) with a centre ``c'`` of their own, shared by the two terms and updated (momentum 0.9) after
each of them [code]. The authors reuse DINO's loss with 1 (intra) or ``r`` (inter) teacher chunks, so its
"never the same view" rule drops student view ``i`` for target chunk ``i``: view 0 (the first global crop)
never enters ``L_intra`` and view ``i`` is left out for neighbour ``i``. ``skip_same_view=True`` keeps that
quirk (the default, for parity); ``False`` uses every view.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

from histobench.ssl.losses import DINOLoss

LossType = Literal["all", "intra_inter", "intra", "inter"]


class PrototypeDistillationLoss(DINOLoss):
    """DINO's centred, sharpened cross-entropy with prototype targets; ``skip_same_view`` switches the pair rule.

    ``forward(student_outputs, target_chunks, teacher_temp) -> (loss, stats)``: ``student_outputs`` are
    per-view ``[M, out_dim]`` logits, ``target_chunks`` per-chunk ``[M, out_dim]`` prototype logits (1 chunk
    for the intra term, ``r`` for the inter term).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, skip_same_view: bool = True):
        super().__init__(out_dim, student_temp, center_momentum)
        self.skip_same_view = skip_same_view

    def forward(self, student_outputs: Sequence[torch.Tensor], target_chunks: Sequence[torch.Tensor],
                teacher_temp: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        target_chunks = [t.detach() for t in target_chunks]
        probs = self.teacher_probs(target_chunks, teacher_temp)
        loss = self.cross_entropy(probs, student_outputs, self.skip_same_view)
        self.update_center(target_chunks)
        return loss, {}


class SLPDLoss(nn.Module):
    """``L_intra`` and ``L_inter`` with one shared prototype centre ``c'`` and the ``loss_type`` ablation switch.

    Args:
        out_dim: Head output width.
        student_temp: Student temperature (0.1).
        center_momentum: Momentum of ``c'`` (0.9).
        loss_type: ``all`` (= the code's ``intra_inter``), ``intra`` or ``inter``; a switched-off term is 0.
        lambda_intra, lambda_inter: Term weights (1.0, 1.0).
        skip_same_view: Replicate the code's view-skipping quirk (see the module docstring).

    ``forward(student_outputs, intra, inter, teacher_temp)``: ``student_outputs`` is the list of per-view
    ``[B, out_dim]`` student logits; ``intra = (mask [B] bool, targets [M, out_dim])`` with ``M = mask.sum()``
    or None; ``inter = (mask [B] bool, [r x [M', out_dim]])`` or None. Returns
    ``(lambda_intra * L_intra + lambda_inter * L_inter, {"loss_intra", "loss_inter"})``; a term without
    targets is an exact zero and leaves ``c'`` unchanged.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 loss_type: LossType = "all", lambda_intra: float = 1.0, lambda_inter: float = 1.0,
                 skip_same_view: bool = True):
        super().__init__()
        if loss_type not in ("all", "intra_inter", "intra", "inter"):
            raise ValueError(f"unknown loss_type {loss_type!r}")
        self.proto = PrototypeDistillationLoss(out_dim, student_temp, center_momentum, skip_same_view)
        self.use_intra = loss_type in ("all", "intra_inter", "intra")
        self.use_inter = loss_type in ("all", "intra_inter", "inter")
        self.lambda_intra, self.lambda_inter = lambda_intra, lambda_inter

    def _term(self, student_outputs, mask, targets, teacher_temp) -> torch.Tensor:
        if mask is None or not bool(mask.any()):
            return student_outputs[0].new_zeros((), dtype=torch.float32)
        return self.proto([s[mask] for s in student_outputs], targets, teacher_temp)[0]

    def forward(self, student_outputs: Sequence[torch.Tensor], intra=None, inter=None,
                teacher_temp: float = 0.04) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        zero = student_outputs[0].new_zeros((), dtype=torch.float32)
        l_intra = self._term(student_outputs, intra[0], [intra[1]], teacher_temp) if (self.use_intra and intra) else zero
        l_inter = self._term(student_outputs, inter[0], list(inter[1]), teacher_temp) if (self.use_inter and inter) else zero
        total = self.lambda_intra * l_intra + self.lambda_inter * l_inter
        return total, {"loss_intra": l_intra.detach(), "loss_inter": l_inter.detach()}
