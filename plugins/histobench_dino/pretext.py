"""DINO: self-distillation with no labels (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021, arXiv:2104.14294; authors' code https://github.com/facebookresearch/dino).

A student (encoder + :class:`~histobench.ssl.heads.DINOProjectionHead`) is trained to match, on every other
view, the centred and sharpened output of a teacher on the two global views
(:class:`~histobench.ssl.losses.DINOLoss`); the teacher is an exponential moving average of the student whose
momentum follows a cosine from 0.996 to 1 (:class:`~histobench.ssl.teacher.EMATeacher`). Views are the multi-crop recipe of
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

from histobench.components import PretrainContext, Pretext
from histobench.ssl.dino import DINO_DEMO_HEAD, DINO_TRAIN_DEFAULTS, DINOStudentTeacherOptions

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


class DINO(Pretext):
    """DINO (Caron et al., ICCV 2021): a student matches an EMA teacher's centred, sharpened outputs across crops."""

    name = "dino"
    ddp_static_graph = True  # every step runs the whole student (backbone and head) on every view
    train_defaults = DINO_TRAIN_DEFAULTS
    presets = {
        "demo": {
            **DINO_DEMO_HEAD,
            "n_local_crops": 4,
            "global_crop_size": 64,
            "local_crop_size": 32,
        }
    }
    train_presets = {
        "demo": {"epochs": 3, "batch_size": 64, "lr": 1e-3, "warmup_epochs": 1, "num_workers": 0},
    }

    class Options(DINOStudentTeacherOptions):  # head, temperatures, momenta, freeze, drop path: see there
        n_local_crops: int = Field(8, ge=0, description="Local crops per image (paper: 8).")
        global_crop_size: int = Field(224, ge=8, description="Global crop side in pixels (paper: 224).")
        local_crop_size: int = Field(96, ge=8, description="Local crop side in pixels (paper: 96).")
        global_crop_scale: tuple[float, float] = Field((0.4, 1.0), description="Area range of global crops.")
        local_crop_scale: tuple[float, float] = Field((0.05, 0.4), description="Area range of local crops.")
        teacher_temp: float = Field(0.04, gt=0, description="Teacher softmax temperature after warm-up.")
        warmup_teacher_temp: float = Field(0.04, gt=0, description="Teacher temperature at step 0.")
        warmup_teacher_temp_epochs: float = Field(
            0, ge=0, description="Linear teacher-temperature warm-up, in epochs (paper: 30 in some settings)."
        )
        rotations: bool = Field(True, description="Also draw vertical flips and 90° rotations (pathology).")

    # ------------------------------------------------------------------------------------------ setup

    def setup(self, encoder: "nn.Module", ctx: PretrainContext) -> None:
        from histobench.ssl.dino import build_student_teacher
        from histobench.ssl.losses import DINOLoss
        from histobench.ssl.steps import teacher_temp_schedule
        from histobench.ssl.teacher import set_drop_path
        from histobench_dino.views import DINOViews

        o = self.options
        self.ctx = ctx
        self.student, self.ema = build_student_teacher(encoder, o, ctx.total_steps, ctx.device)
        self.teacher = self.ema.module
        if o.drop_path_rate > 0:  # otherwise the encoder keeps its own
            set_drop_path(encoder, o.drop_path_rate)
        self.loss = DINOLoss(o.out_dim, o.student_temp, o.center_momentum).to(ctx.device)
        t = ctx.encoder_component.transform()
        self.views = DINOViews(o, t.mean, t.std)

        self.teacher_temp_schedule = teacher_temp_schedule(o.warmup_teacher_temp, o.teacher_temp,
                                                           o.warmup_teacher_temp_epochs, ctx.steps_per_epoch,
                                                           ctx.total_steps)
        self.freeze_last_layer_steps = int(round(o.freeze_last_layer_epochs * ctx.steps_per_epoch))

    def student_modules(self) -> dict[str, "nn.Module"]:
        return {"backbone": self.student.backbone, "head": self.student.head}

    # ------------------------------------------------------------------------------------------- step

    def training_step(self, batch: dict[str, "torch.Tensor"], step: int) -> dict[str, Any]:
        import torch

        from histobench.ssl.steps import step_generator, value_at

        generator = step_generator(self.ctx.seed, step, self.ctx.rank, self.ctx.device)
        views = self.views(batch["images"], generator)
        with torch.no_grad():
            teacher_out = self.teacher.forward_views(views[:self.views.n_global])
        student_out = self.student.forward_views(views)
        temp = value_at(self.teacher_temp_schedule, step)
        loss, stats = self.loss(student_out, teacher_out, temp)
        return {"loss": loss, "teacher_entropy": stats["teacher_entropy"], "teacher_temp": temp,
                "momentum": self.ema.momentum(step)}

    def before_optimizer_step(self, step: int) -> None:
        from histobench.ssl.teacher import cancel_last_layer_grads

        cancel_last_layer_grads(self.student.head, step, self.freeze_last_layer_steps)

    def after_optimizer_step(self, step: int) -> None:
        self.ema.update(self.student, step)

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(), "loss": self.loss.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.loss.load_state_dict(state["loss"])

    def trained_encoder(self) -> "nn.Module":
        return self.teacher.backbone
