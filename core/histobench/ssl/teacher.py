"""The teacher of student–teacher self-distillation, and the training-time rules around it.

The teacher is an exponential moving average of the student's weights (mean teacher: Tarvainen & Valpola,
NeurIPS 2017; BYOL: Grill et al., NeurIPS 2020; DINO: Caron et al., ICCV 2021, arXiv:2104.14294, Sec. 3.1):
after every optimiser step ``teacher <- m * teacher + (1 - m) * student``, with ``m`` following a cosine
from its start value (DINO: 0.996) to 1 over training. It starts as a copy of the student, never gets
gradients, and runs without stochastic depth, which only the student uses (DINO Appendix: drop path 0.1
on the student). DINO also freezes its head's last layer during the first epoch: the gradients of that
layer are dropped before the optimiser step, so AdamW neither moves nor decays it.

Parts: :func:`set_drop_path`, :func:`make_teacher`, :func:`ema_update`, :class:`EMATeacher` (a teacher
module with its momentum schedule) and :func:`cancel_last_layer_grads`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from histobench.ssl.steps import value_at

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def set_drop_path(module: "nn.Module", rate: float) -> bool:
    """Stochastic depth ``rate`` on every outermost submodule of ``module`` with a ``set_drop_path(rate)`` method.

    Encoders offer ``set_drop_path`` when they can (timm ViTs, HIPT's region ViT). Returns whether any
    submodule took the rate; a module without one is left unchanged.
    """
    if hasattr(module, "set_drop_path"):
        return module.set_drop_path(rate) is not False
    changed = False
    for child in module.children():
        changed = set_drop_path(child, rate) or changed
    return changed


def make_teacher(student: "nn.Module") -> "nn.Module":
    """A deep copy of ``student`` without stochastic depth and without gradients (``requires_grad`` off)."""
    import copy

    teacher = copy.deepcopy(student)
    set_drop_path(teacher, 0.0)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def ema_update(teacher: "nn.Module", student: "nn.Module", momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, parameter by parameter, in place.

    The two modules must list the same parameters in the same order (a teacher from :func:`make_teacher`).
    Buffers are not averaged.
    """
    import torch

    with torch.no_grad():
        teacher_params = list(teacher.parameters())
        student_params = [p.detach() for p in student.parameters()]
        if len(teacher_params) != len(student_params):
            raise ValueError(f"teacher has {len(teacher_params)} parameters, student {len(student_params)}")
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)


class EMATeacher:
    """A teacher (``module``) made from ``student`` and its cosine momentum schedule (``schedule``, one value a step).

    ``momentum(step)`` is the value used after step ``step``; ``update(student, step)`` applies it. The
    pretext keeps ``module`` in its state dict like any other module.
    """

    def __init__(self, student: "nn.Module", total_steps: int, momentum: float = 0.996, final_momentum: float = 1.0):
        from histobench.pretrain.schedules import cosine_schedule

        self.module = make_teacher(student)
        self.schedule = cosine_schedule(momentum, final_momentum, max(int(total_steps), 1))

    def momentum(self, step: int) -> float:
        return value_at(self.schedule, step)

    def update(self, student: "nn.Module", step: int) -> None:
        ema_update(self.module, student, self.momentum(step))


def cancel_last_layer_grads(head: "nn.Module", step: int, freeze_steps: int) -> bool:
    """During the first ``freeze_steps`` steps, drop the gradients of ``head.last_layer_parameters()``.

    Call it between ``backward`` and the optimiser step (the pretext's ``before_optimizer_step``). A
    parameter without a gradient is skipped by AdamW (no update, no weight decay, no moment update).
    Returns whether the layer was frozen at this step.
    """
    if step >= freeze_steps:
        return False
    for p in head.last_layer_parameters():
        p.grad = None
    return True
