"""DINO: self-distillation with no labels (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021, arXiv:2104.14294; authors' code https://github.com/facebookresearch/dino).

A student (encoder + :class:`~histobench_dino.heads.DINOProjectionHead`) is trained to match, on every other
view, the centred and sharpened output of a teacher on the two global views
(:class:`~histobench_dino.loss.DINOLoss`); the teacher is an exponential moving average of the student whose
momentum follows a cosine from 0.996 to 1. Views are the multi-crop recipe of
:class:`~histobench_dino.views.DINOViews`, made on the training device.

Defaults are the paper's ViT-S/16 setting (Sec. 4, Appendix): K=65536 prototypes, a 2048-wide head with a
256-d bottleneck and a weight-normalised last layer whose gain is fixed (``norm_last_layer``) and which is
frozen during the first epoch; student temperature 0.1, teacher temperature 0.04 (the paper warms it up
linearly from 0.04 over 30 epochs for some longer runs and reports 0.07 as unstable without warm-up;
our warm-up is linear per step rather than per epoch); 2 global crops at 224 px of scale (0.4, 1) and 8
local crops at 96 px of scale (0.05, 0.4); AdamW at lr 5e-4 per 256 images with 10 warm-up epochs and a
cosine to 1e-6; weight decay cosine 0.04 -> 0.4; gradient clipping 3.0; stochastic depth 0.1 on the student.
Training: the paper's ViT-S/16 runs use batch 1024 for 100-800 epochs; we default to batch 256 (what a
single GPU holds and what pathology DINO runs commonly use) with the lr scaled linearly by the trainer.
Pathology adds rotation invariance: ``rotations`` draws vertical flips and 90° rotations as well.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from histobench.components import PretrainContext, Pretext, StrictOptions

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


class DINO(Pretext):
    """DINO (Caron et al., ICCV 2021): a student matches an EMA teacher's centred, sharpened outputs across crops."""

    name = "dino"
    ddp_static_graph = True  # every step runs the whole student (backbone and head) on every view
    train_defaults = {
        "epochs": 100,
        "batch_size": 256,
        "lr": 5e-4,
        "min_lr": 1e-6,
        "warmup_epochs": 10,
        "weight_decay": 0.04,
        "weight_decay_end": 0.4,
        "clip_grad": 3.0,
    }
    presets = {
        "demo": {
            "out_dim": 1024,
            "hidden_dim": 256,
            "bottleneck_dim": 64,
            "n_local_crops": 4,
            "global_crop_size": 64,
            "local_crop_size": 32,
        }
    }
    train_presets = {
        "demo": {"epochs": 3, "batch_size": 64, "lr": 1e-3, "warmup_epochs": 1, "num_workers": 0},
    }

    class Options(StrictOptions):
        out_dim: int = Field(65536, ge=2, description="Prototypes K, the head's output width (paper: 65536).")
        hidden_dim: int = Field(2048, ge=1, description="Head MLP hidden width (paper: 2048).")
        bottleneck_dim: int = Field(256, ge=1, description="Head bottleneck width (paper: 256).")
        norm_last_layer: bool = Field(True, description="Fix the weight-norm gain of the head's last layer to 1.")
        n_local_crops: int = Field(8, ge=0, description="Local crops per image (paper: 8).")
        global_crop_size: int = Field(224, ge=8, description="Global crop side in pixels (paper: 224).")
        local_crop_size: int = Field(96, ge=8, description="Local crop side in pixels (paper: 96).")
        global_crop_scale: tuple[float, float] = Field((0.4, 1.0), description="Area range of global crops.")
        local_crop_scale: tuple[float, float] = Field((0.05, 0.4), description="Area range of local crops.")
        student_temp: float = Field(0.1, gt=0, description="Student softmax temperature.")
        teacher_temp: float = Field(0.04, gt=0, description="Teacher softmax temperature after warm-up.")
        warmup_teacher_temp: float = Field(0.04, gt=0, description="Teacher temperature at step 0.")
        warmup_teacher_temp_epochs: float = Field(
            0, ge=0, description="Linear teacher-temperature warm-up, in epochs (paper: 30 in some settings)."
        )
        momentum_teacher: float = Field(0.996, ge=0, le=1, description="Initial EMA momentum (cosine to 1).")
        center_momentum: float = Field(0.9, ge=0, lt=1, description="EMA momentum of the teacher centre.")
        freeze_last_layer_epochs: float = Field(1, ge=0, description="Epochs with the head's last layer frozen.")
        drop_path_rate: float = Field(0.1, ge=0, lt=1, description="Student stochastic depth (if the encoder supports it).")
        rotations: bool = Field(True, description="Also draw vertical flips and 90° rotations (pathology).")

    # ------------------------------------------------------------------------------------------ setup

    def setup(self, encoder: "nn.Module", ctx: PretrainContext) -> None:
        import copy

        import numpy as np

        from histobench.pretrain.schedules import cosine_schedule
        from histobench_dino.heads import BackboneWithHead, DINOProjectionHead
        from histobench_dino.loss import DINOLoss
        from histobench_dino.views import DINOViews

        o = self.options
        self.ctx = ctx
        teacher_backbone = copy.deepcopy(encoder)  # before the student gets stochastic depth
        if hasattr(teacher_backbone, "set_drop_path"):
            teacher_backbone.set_drop_path(0.0)
        if o.drop_path_rate > 0 and hasattr(encoder, "set_drop_path"):
            encoder.set_drop_path(o.drop_path_rate)
        head = DINOProjectionHead(encoder.embed_dim, o.out_dim, o.hidden_dim, o.bottleneck_dim,
                                  norm_last_layer=o.norm_last_layer).to(ctx.device)
        self.student = BackboneWithHead(encoder, head)
        self.teacher = BackboneWithHead(teacher_backbone, copy.deepcopy(head))
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.loss = DINOLoss(o.out_dim, o.student_temp, o.center_momentum).to(ctx.device)
        t = ctx.encoder_component.transform()
        self.views = DINOViews(o, t.mean, t.std)

        total = max(int(ctx.total_steps), 1)
        self.momentum_schedule = cosine_schedule(o.momentum_teacher, 1.0, total)
        warm = min(int(round(o.warmup_teacher_temp_epochs * ctx.steps_per_epoch)), total)
        self.teacher_temp_schedule = np.concatenate(
            [np.linspace(o.warmup_teacher_temp, o.teacher_temp, warm), np.full(total - warm, o.teacher_temp)]
        )
        self.freeze_last_layer_steps = int(round(o.freeze_last_layer_epochs * ctx.steps_per_epoch))

    def student_modules(self) -> dict[str, "nn.Module"]:
        return {"backbone": self.student.backbone, "head": self.student.head}

    # ------------------------------------------------------------------------------------------- step

    def _generator(self, step: int) -> "torch.Generator":
        """A generator on the training device seeded from (seed, step, rank): reproducible, and resumable."""
        import numpy as np
        import torch

        seed = int(np.random.SeedSequence([self.ctx.seed, step, self.ctx.rank]).generate_state(1, np.uint64)[0] >> 1)
        return torch.Generator(device=self.ctx.device).manual_seed(seed)

    @staticmethod
    def _at(schedule, step: int) -> float:
        return float(schedule[min(max(step, 0), len(schedule) - 1)])

    def training_step(self, batch: dict[str, "torch.Tensor"], step: int) -> dict[str, Any]:
        import torch

        views = self.views(batch["images"], self._generator(step))
        n_global = self.views.n_global
        with torch.no_grad():
            teacher_out = self.teacher.forward_views(views[:n_global])
        student_out = self.student.forward_views(views)
        temp = self._at(self.teacher_temp_schedule, step)
        loss, stats = self.loss(student_out, teacher_out, temp)
        return {"loss": loss, "teacher_entropy": stats["teacher_entropy"], "teacher_temp": temp,
                "momentum": self._at(self.momentum_schedule, step)}

    def before_optimizer_step(self, step: int) -> None:
        if step < self.freeze_last_layer_steps:
            for p in self.student.head.last_layer_parameters():
                p.grad = None  # AdamW skips a parameter without a gradient (no decay, no moment update)

    def after_optimizer_step(self, step: int) -> None:
        import torch

        m = self._at(self.momentum_schedule, step)
        with torch.no_grad():
            teacher = list(self.teacher.parameters())
            student = [p.detach() for p in self.student.parameters()]
            torch._foreach_lerp_(teacher, student, 1.0 - m)  # teacher <- m * teacher + (1 - m) * student

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(), "loss": self.loss.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.loss.load_state_dict(state["loss"])

    def trained_encoder(self) -> "nn.Module":
        return self.teacher.backbone
