"""DINO's student–teacher recipe as the pretexts built on it share it (DINO, SLPD; DiRL next).

DINO (Caron et al., ICCV 2021, arXiv:2104.14294, Sec. 3.1, Sec. 4 and Appendix) trains a student (backbone +
:class:`~histobench.ssl.heads.DINOProjectionHead`) against an EMA teacher
(:class:`~histobench.ssl.teacher.EMATeacher`) with :class:`~histobench.ssl.losses.DINOLoss`. HIPT's DINO-4K
(Chen et al., CVPR 2022) and SLPD (Yu et al., MICCAI 2023) reuse the recipe unchanged for region ViTs.

* :data:`DINO_TRAIN_DEFAULTS`: the ViT-S/16 training policy for the one trainer (AdamW lr 5e-4 per 256
  images, 10 warm-up epochs, cosine to 1e-6; weight decay cosine 0.04 -> 0.4; gradient clipping 3.0;
  100 epochs; batch 256). A pretext overrides what its paper changes (SLPD: batch 512).
* :data:`DINO_DEMO_HEAD`: the head sizes of the CPU-sized ``demo`` presets.
* :class:`DINOStudentTeacherOptions`: the options of the head, the temperatures, the two momenta, the
  last-layer freeze and the student's stochastic depth, with the paper's defaults; a pretext's ``Options``
  inherits them and adds its own.
* :func:`build_student_teacher`: the student and its EMA teacher from an encoder and those options.

Importing this module does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from histobench.components import StrictOptions

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from histobench.ssl.heads import BackboneWithHead
    from histobench.ssl.teacher import EMATeacher

DINO_TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 100,
    "batch_size": 256,
    "lr": 5e-4,
    "min_lr": 1e-6,
    "warmup_epochs": 10,
    "weight_decay": 0.04,
    "weight_decay_end": 0.4,
    "clip_grad": 3.0,
}

# a CPU-sized head for demo presets (a few seconds a step on 2 cores with the demo encoders)
DINO_DEMO_HEAD: dict[str, Any] = {"out_dim": 1024, "hidden_dim": 256, "bottleneck_dim": 64}


class DINOStudentTeacherOptions(StrictOptions):
    """Head, temperatures, centre and EMA momenta, last-layer freeze, student drop path (DINO ViT-S/16 defaults)."""

    out_dim: int = Field(65536, ge=2, description="Prototypes K, the head's output width (DINO, HIPT, SLPD: 65536).")
    hidden_dim: int = Field(2048, ge=1, description="Head MLP hidden width (2048).")
    bottleneck_dim: int = Field(256, ge=1, description="Head bottleneck width (256).")
    norm_last_layer: bool = Field(True, description="Fix the weight-norm gain of the head's last layer to 1.")
    student_temp: float = Field(0.1, gt=0, description="Student softmax temperature (0.1).")
    teacher_temp: float = Field(0.04, gt=0, description="Teacher softmax temperature (0.04).")
    center_momentum: float = Field(0.9, ge=0, lt=1, description="EMA momentum of the teacher centre (0.9).")
    momentum_teacher: float = Field(0.996, ge=0, le=1, description="Initial EMA momentum of the teacher (cosine to 1).")
    freeze_last_layer_epochs: float = Field(1, ge=0, description="Epochs with the head's last layer frozen (1).")
    drop_path_rate: float = Field(0.1, ge=0, lt=1, description="Student stochastic depth (teacher: 0).")


def build_student_teacher(encoder: "nn.Module", options: DINOStudentTeacherOptions, total_steps: int,
                          device: "torch.device | str") -> tuple["BackboneWithHead", "EMATeacher"]:
    """``(student, ema)``: ``encoder`` + a new DINO head on ``device``, and an EMA teacher copied from it.

    The teacher copy has stochastic depth off; the student's drop path is left to the caller (pretexts
    differ on whether a rate of 0 overrides the encoder's own). The head draws its initial weights from
    torch's global generator.
    """
    from histobench.ssl.heads import BackboneWithHead, DINOProjectionHead
    from histobench.ssl.teacher import EMATeacher

    o = options
    head = DINOProjectionHead(encoder.embed_dim, o.out_dim, o.hidden_dim, o.bottleneck_dim,
                              norm_last_layer=o.norm_last_layer).to(device)
    student = BackboneWithHead(encoder, head)
    return student, EMATeacher(student, total_steps, o.momentum_teacher)
