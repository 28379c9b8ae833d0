"""DiRL: Diversity-inducing Representation Learning (Kapse, Das, Zhang, Gupta, Saltz, Samaras, Prasanna,
"Attention De-sparsification Matters: Inducing Diversity in Digital Pathology Representation Learning",
arXiv 2309.06439, 2023; Medical Image Analysis 2024). Spec: ``/work/shared/methods/dirl.md``.

**This is the reconstruction "DiRL-R", not the authors' method verbatim**: the official repository
(bmi-imaginelab/DiRL) holds no code, and every detail past the abstract (K, the groups, the pooling, the
loss form and weight, the views the dense term uses) follows the spec's reconstruction.

DINO (Caron et al., ICCV 2021) on the [CLS] token, built from the same :mod:`histobench.ssl` parts as the
``dino`` pretext (head, loss, EMA teacher, step generator, last-layer freeze), plus a prior-guided dense
term: a nuclei segmentation (the segmentation stage's cache) is grouped into K groups per pixel
(:mod:`~histobench_dirl.grouping`: cell types, G1 morphology pseudo-types or G2 nucleus/none), the group map
is cropped, flipped and rotated with each view (:mod:`~histobench_dirl.views`), its per-token occupancy pools
the patch tokens into one embedding per group, and each group's embedding in one global view is distilled
towards the teacher's embedding of the same group in the other (:mod:`~histobench_dirl.loss`), through a
head ``g_d`` of its own with a centre ``c_d`` of its own. ``L = L_img + λ L_dense``.

Defaults (spec §2.7; the lab's DINO recipe): ViT-S/16 at 224 px, head 2048/256/65536 with a fixed-gain last
layer frozen in epoch 0, τ_s 0.1, τ_t 0.04, centre momentum 0.9, EMA 0.996 -> 1, 2 global crops of scale
(0.4, 1) and no local crops, jitter (0.8, 0.8, 0.8, 0.2) p 0.8, grayscale 0.2, blur p 0.5, no solarisation;
DiRL-R: λ = 1, a_min = 1 token, g_d out_dim 65536, G1 with C = 3. With λ = 0 a step is a DINO step: the
same random numbers, the same forward passes, the same loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from histobench.components import PretrainContext, Pretext
from histobench.ssl.dino import DINO_DEMO_HEAD, DINO_TRAIN_DEFAULTS, DINOStudentTeacherOptions

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


def cls_and_patches(backbone: "nn.Module", x: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(pooled [B, D], patch tokens [B, N, D])`` from one forward: the encoder's ``forward_tokens`` and, for a
    timm model, its own ``forward_head`` on those tokens (exactly what ``backbone(x)`` computes), else [CLS]."""
    tokens = backbone.forward_tokens(x)
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    head = getattr(getattr(backbone, "model", None), "forward_head", None)
    pooled = head(tokens) if callable(head) else tokens[:, 0]
    return pooled, tokens[:, prefix:]


class DiRL(Pretext):
    """DiRL-R (Kapse et al. 2023, reconstruction): DINO plus a dense loss on cell-prior-pooled patch tokens."""

    name = "dirl"
    requires = frozenset({"tiles", "masks"})
    default_segmenter = "stardist"
    demo_segmenter = "oracle"
    ddp_static_graph = False  # the dense head is skipped in a step without a valid (pair, group) term
    train_defaults = DINO_TRAIN_DEFAULTS
    presets = {
        # spec §3.4's scaled config on the demo encoder (64 px, patch 8: 8x8 tokens)
        "demo": {
            **DINO_DEMO_HEAD,
            "dense_out_dim": 1024,
            "global_crop_size": 64,
            "local_crop_size": 32,
            "n_local_crops": 0,
            "a_min": 0.5,
            "grouping": "types",
            "momentum_teacher": 0.99,
        },
        "binary": {"grouping": "binary"},
    }
    train_presets = {
        "demo": {"epochs": 3, "batch_size": 32, "lr": 2e-3, "warmup_epochs": 1, "num_workers": 0},  # 2.5e-4 at batch 32, as DINO's demo
    }

    class Options(DINOStudentTeacherOptions):  # head, temperatures, momenta, freeze, drop path: see there
        grouping: Literal["morphology", "types", "binary"] = Field(
            "morphology", description="Cell prior: G1 morphology pseudo-types (k-means), the segmenter's types, "
                                      "or G2 nucleus vs none.")
        types: tuple[int, ...] = Field((1, 2, 3), description="grouping=types: the type ids, one group each "
                                       "(oracle: 1 tumour, 2 lymphocyte, 3 fibroblast); others join no-nucleus.")
        clusters: int = Field(3, ge=2, description="grouping=morphology: k-means clusters C (refit with 2 when one "
                                                   "holds < min_cluster_fraction).")
        min_cluster_fraction: float = Field(0.02, ge=0, lt=0.5, description="Smallest cluster share before refit.")
        max_fit_nuclei: int = Field(200_000, ge=10, description="Nuclei sampled for the k-means fit.")
        grouping_seed: int = Field(0, description="Seed of the nucleus sample and of k-means.")
        dense_lambda: float = Field(1.0, ge=0, description="λ, weight of the dense loss (0: DINO).")
        a_min: float = Field(1.0, ge=0, description="Smallest group mass, in tokens, in both views of a pair.")
        dense_out_dim: int = Field(65536, ge=2, description="Prototypes of the dense head g_d.")
        share_head: bool = Field(False, description="Ablation: g_d is the image head (its centre stays separate).")
        n_local_crops: int = Field(0, ge=0, description="Local crops (lab DINO: 0); the dense term uses global views.")
        global_crop_size: int = Field(224, ge=8, description="Global crop side in pixels.")
        local_crop_size: int = Field(96, ge=8, description="Local crop side in pixels.")
        global_crop_scale: tuple[float, float] = Field((0.4, 1.0), description="Area range of global crops.")
        local_crop_scale: tuple[float, float] = Field((0.05, 0.4), description="Area range of local crops.")
        color_jitter: tuple[float, float, float, float] = Field(
            (0.8, 0.8, 0.8, 0.2), description="Brightness, contrast, saturation, hue (lab DINO).")
        color_jitter_p: float = Field(0.8, ge=0, le=1, description="Colour jitter probability.")
        grayscale_p: float = Field(0.2, ge=0, le=1, description="Grayscale probability.")
        global_blur_p: tuple[float, ...] = Field((0.5,), description="Blur probability per global view (last repeats).")
        global_solarize_p: tuple[float, ...] = Field((0.0,), description="Solarisation probability per global view.")
        local_blur_p: float = Field(0.5, ge=0, le=1, description="Blur probability of local views.")
        rotations: bool = Field(True, description="Also vertical flips and 90° rotations (pathology).")
        teacher_temp: float = Field(0.04, gt=0, description="Teacher temperature after warm-up (both heads).")
        warmup_teacher_temp: float = Field(0.04, gt=0, description="Teacher temperature at step 0.")
        warmup_teacher_temp_epochs: float = Field(0, ge=0, description="Linear teacher-temperature warm-up, epochs.")

    # ------------------------------------------------------------------------------------------ setup

    def setup(self, encoder: "nn.Module", ctx: PretrainContext) -> None:
        from histobench.ssl.dino import build_student_teacher
        from histobench.ssl.heads import DINOProjectionHead
        from histobench.ssl.losses import DINOLoss
        from histobench.ssl.steps import teacher_temp_schedule
        from histobench.ssl.teacher import make_teacher, set_drop_path
        from histobench_dirl.grouping import make_grouping
        from histobench_dirl.loss import DenseLoss
        from histobench_dirl.views import DiRLViews

        o = self.options
        self.ctx = ctx
        # the same order of draws from torch's global generator as DINO's setup: student head first
        self.student, self.ema = build_student_teacher(encoder, o, ctx.total_steps, ctx.device)
        self.teacher = self.ema.module
        if o.drop_path_rate > 0:  # otherwise the encoder keeps its own
            set_drop_path(encoder, o.drop_path_rate)
        self.loss = DINOLoss(o.out_dim, o.student_temp, o.center_momentum).to(ctx.device)
        if o.share_head:
            self.dense_head, self.dense_teacher = self.student.head, self.teacher.head
            dense_dim = o.out_dim
        else:
            self.dense_head = DINOProjectionHead(encoder.embed_dim, o.dense_out_dim, o.hidden_dim, o.bottleneck_dim,
                                                 norm_last_layer=o.norm_last_layer).to(ctx.device)
            self.dense_teacher = make_teacher(self.dense_head)
            dense_dim = o.dense_out_dim
        self.dense_loss = DenseLoss(dense_dim, o.student_temp, o.center_momentum, o.a_min).to(ctx.device)
        t = ctx.encoder_component.transform()
        self.views = DiRLViews(o, t.mean, t.std)

        self.teacher_temp_schedule = teacher_temp_schedule(o.warmup_teacher_temp, o.teacher_temp,
                                                           o.warmup_teacher_temp_epochs, ctx.steps_per_epoch,
                                                           ctx.total_steps)
        self.freeze_last_layer_steps = int(round(o.freeze_last_layer_epochs * ctx.steps_per_epoch))
        slide_ids = tuple(ctx.cohort.slide_ids) if ctx.cohort is not None else ()
        self.grouping = make_grouping(o.grouping, ctx.segmentation.get("root"), slide_ids, o.types, o.clusters,
                                      o.max_fit_nuclei, o.grouping_seed, o.min_cluster_fraction,
                                      reporter=ctx.extra.get("reporter"))
        self.lookup = None  # GroupLookup of the training tiles (morphology), built in on_epoch_start

    def student_modules(self) -> dict[str, "nn.Module"]:
        modules = {"backbone": self.student.backbone, "head": self.student.head}
        if not self.options.share_head:
            modules["dense_head"] = self.dense_head
        return modules

    @property
    def n_groups(self) -> int:
        return self.grouping.n_groups

    # -------------------------------------------------------------------------------------- epoch start

    def on_epoch_start(self, epoch: int, loader: Any = None) -> dict[str, float] | None:
        """Build the per-nucleus group table of the training tiles once (morphology), and report the prior."""
        if loader is None or not self.grouping.needs_table or self.lookup is not None:
            return None
        from histobench_dirl.grouping import GroupLookup

        root = self.ctx.segmentation.get("root")
        self.lookup = GroupLookup(root, tuple(self.ctx.cohort.slide_ids), loader, self.grouping, self.ctx.device,
                                  seed=self.ctx.seed)
        m = self.grouping.model
        return {"groups": float(self.n_groups), "group_cache_hits": float(self.lookup.hits),
                **{f"cluster_{c}_share": float(v) for c, v in enumerate(m.sizes)}}

    def group_maps(self, batch: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """``[B, H, W]`` long group ids of a batch (0 = no nucleus)."""
        if not self.grouping.needs_table:
            return self.grouping.pixel_groups(batch["instances"], batch["types"])
        if self.lookup is None:
            raise RuntimeError("DiRL's group table is built in on_epoch_start, which did not run")
        return self.lookup(batch["instances"], batch["slide_index"], batch["tile_index"])

    # ------------------------------------------------------------------------------------------- step

    def training_step(self, batch: dict[str, "torch.Tensor"], step: int) -> dict[str, Any]:
        import torch

        from histobench.ssl.steps import step_generator, value_at
        from histobench_dirl.loss import pool_groups
        from histobench_dirl.views import occupancy

        o = self.options
        k = self.n_groups
        generator = step_generator(self.ctx.seed, step, self.ctx.rank, self.ctx.device)
        views, group_views = self.views(batch["images"], self.group_maps(batch), generator)
        n_global = self.views.n_global
        b = batch["images"].shape[0]
        grid = self.student.backbone.token_grid(views[0]) if hasattr(self.student.backbone, "token_grid") else None
        with torch.no_grad():
            t_cls, t_tok = cls_and_patches(self.teacher.backbone, torch.cat(views[:n_global]))
            teacher_out = list(self.teacher.head(t_cls).split(b))
        s_cls, s_tok = cls_and_patches(self.student.backbone, torch.cat(views[:n_global]))
        student_out = list(self.student.head(s_cls).split(b))
        if len(views) > n_global:  # local crops: image loss only (spec §5.10)
            student_out += self.student.forward_views(views[n_global:])
        temp = value_at(self.teacher_temp_schedule, step)
        loss_img, stats = self.loss(student_out, teacher_out, temp)

        if grid is None:
            side = int(round(s_tok.shape[1] ** 0.5))
            grid = (side, s_tok.shape[1] // side)
        occ = [occupancy(g, k, tuple(grid)) for g in group_views[:n_global]]
        s_z, masses = zip(*[pool_groups(t, a) for t, a in zip(s_tok.split(b), occ)])
        with torch.no_grad():
            t_z = [pool_groups(t, a)[0] for t, a in zip(t_tok.split(b), occ)]
        out = {"loss_img": loss_img.detach(), "teacher_entropy": stats["teacher_entropy"], "teacher_temp": temp,
               "momentum": self.ema.momentum(step)}
        if o.dense_lambda == 0:  # exactly DINO: the dense head is not run (its parameters get no gradient)
            from histobench_dirl.loss import valid_pairs

            count = sum(int(v.sum()) for v in valid_pairs(masses, o.a_min).values())
            zero = loss_img.detach() * 0
            return {"loss": loss_img, **out, "loss_dense": zero, "valid_terms": float(count),
                    "valid_groups": count / max(n_global * (n_global - 1) * b, 1)}
        loss_dense, dstats = self.dense_loss(list(s_z), t_z, list(masses), self.dense_head, self.dense_teacher, temp)
        with torch.no_grad():
            pooled_std = torch.cat([z[m >= o.a_min] for z, m in zip(s_z, masses)]).float().std(0).mean() \
                if dstats["valid_terms"] else loss_img.new_zeros(())
        return {"loss": loss_img + o.dense_lambda * loss_dense, **out, "loss_dense": loss_dense.detach(),
                "valid_terms": dstats["valid_terms"], "valid_groups": dstats["valid_groups"],
                "dense_teacher_entropy": dstats["teacher_entropy"], "pooled_std": pooled_std}

    def before_optimizer_step(self, step: int) -> None:
        from histobench.ssl.teacher import cancel_last_layer_grads

        cancel_last_layer_grads(self.student.head, step, self.freeze_last_layer_steps)
        if not self.options.share_head:
            cancel_last_layer_grads(self.dense_head, step, self.freeze_last_layer_steps)

    def after_optimizer_step(self, step: int) -> None:
        from histobench.ssl.teacher import ema_update

        self.ema.update(self.student, step)
        if not self.options.share_head:
            ema_update(self.dense_teacher, self.dense_head, self.ema.momentum(step))

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        state = {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                 "loss": self.loss.state_dict(), "dense_loss": self.dense_loss.state_dict()}
        if not self.options.share_head:
            state["dense_head"] = self.dense_head.state_dict()
            state["dense_teacher"] = self.dense_teacher.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.loss.load_state_dict(state["loss"])
        self.dense_loss.load_state_dict(state["dense_loss"])
        if not self.options.share_head:
            self.dense_head.load_state_dict(state["dense_head"])
            self.dense_teacher.load_state_dict(state["dense_teacher"])

    def trained_encoder(self) -> "nn.Module":
        return self.teacher.backbone
