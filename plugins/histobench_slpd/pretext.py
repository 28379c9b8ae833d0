"""SLPD: Slide-Level Prototypical Distillation (Yu, Lin, Xu, "SLPD: Slide-level Prototypical Distillation for
WSIs", MICCAI 2023, arXiv:2307.10696; authors' code https://github.com/Carboxy/SLPD, a fork of HIPT's
``HIPT_4K`` DINO pretraining, https://github.com/mahmoodlab/HIPT). Spec: ``/work/shared/methods/slpd.md``.

The region encoder (:class:`~histobench_slpd.encoder.HIPTRegionEncoder`, HIPT's ViT-4K over grids of frozen
ViT-256 patch embeddings) is trained from scratch with DINO (the 2 global 14x14 + 8 local 6x6 grid crops of
:class:`~histobench_slpd.views.SLPDGridViews`; head, loss and EMA teacher from :mod:`histobench.ssl`) and, after
``warm_epoch`` epochs, two more distillation terms built once per epoch from the teacher
(:mod:`~histobench_slpd.clustering`, :mod:`~histobench_slpd.loss`):

* at the start of every epoch ``e > warm_epoch`` (0-indexed: with 20, from the 22nd epoch), the teacher
  embeds the centre crop of every region (the L2-normalised 256-d head bottleneck by default), each slide
  with ``n_s >= n_min`` regions is clustered into ``K`` prototypes, slides are compared by the optimal
  one-to-one matching of their prototypes, and each slide's ``r`` nearest slides are its neighbours;
* ``L_intra`` distils every student view of a region towards the teacher's last layer applied to the
  region's own prototype; ``L_inter`` towards the matching prototype of each neighbour slide.

``L = L_self + lambda_intra * L_intra + lambda_inter * L_inter``; before the first clustering ``L = L_self``.

Defaults are the authors' NSCLC run (K 4, n_min 32, r 1; BRCA: K 2, n_min 16) and HIPT's DINO-4K recipe:
head 2048/256/65536 with a fixed-gain weight-normalised last layer frozen in epoch 0, temperatures 0.1 / 0.04
(constant: no teacher-temperature warm-up), centre momentum 0.9 for both centres, EMA momentum cosine
0.996 -> 1, student stochastic depth 0.1; 100 epochs, batch 512 (4 GPUs x 128), lr 5e-4 per 256 with 10
warm-up epochs and a cosine to 1e-6, weight decay cosine 0.04 -> 0.4, gradient clipping 3.0.
Harness differences: the one trainer clips the global gradient norm (the code clips each parameter's norm
to 3.0) and uses bf16 autocast on CUDA (the code: fp16 + GradScaler).

Data: ``batch["grids"]`` float ``[B, D, h, w]``, ``batch["slide_index"]`` and ``batch["tile_index"]`` (the
region's position within its slide). The dataset (:class:`~histobench_slpd.data.RegionGridDataset`) lists
each slide's regions contiguously, so a region's global row is ``offsets[slide] + tile_index``, with the
offsets rebuilt from ``dataset.slide_index`` in every ``on_epoch_start``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from histobench.components import PretrainContext, Pretext
from histobench.ssl.dino import DINO_DEMO_HEAD, DINO_TRAIN_DEFAULTS, DINOStudentTeacherOptions

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


class SLPD(Pretext):
    """SLPD (Yu et al., MICCAI 2023): DINO on region grids plus intra- and inter-slide prototype distillation."""

    name = "slpd"
    requires = frozenset({"regions"})
    default_encoder = "hipt-vit4k"
    # every step runs the whole student on every view; after the warm-up the prototype terms reuse its outputs
    ddp_static_graph = True
    train_defaults = {**DINO_TRAIN_DEFAULTS, "batch_size": 512}  # HIPT DINO-4K: 4 GPUs x 128
    presets = {
        # spec section 3 "small (CPU)" column, on 8x8 demo grids (6x6 global, 3x3 local crops)
        "demo": {
            **DINO_DEMO_HEAD,
            "n_local_crops": 4,
            "global_crop_size": 6,
            "local_crop_size": 3,
            "n_prototypes": 3,
            "min_regions": 8,
            "n_neighbours": 1,
            "warm_epoch": 2,
            "momentum_teacher": 0.99,
        },
        "brca": {"n_prototypes": 2, "min_regions": 16},
    }
    train_presets = {
        "demo": {"epochs": 6, "batch_size": 32, "lr": 5e-4, "warmup_epochs": 1, "num_workers": 0},
    }

    class Options(DINOStudentTeacherOptions):  # head, temperatures, momenta, freeze, drop path: see there
        bottleneck_dim: int = Field(256, ge=1, description="Head bottleneck width, the clustering space (256).")
        teacher_temp: float = Field(0.04, gt=0, description="Teacher/prototype temperature, constant (no warm-up).")
        center_momentum: float = Field(0.9, ge=0, lt=1, description="Momentum of both centres c and c'.")
        n_local_crops: int = Field(8, ge=0, description="Local grid crops per region (8).")
        global_crop_size: int = Field(14, ge=1, description="Global crop side in grid cells (14 of 16); also the clustering view.")
        local_crop_size: int = Field(6, ge=1, description="Local crop side in grid cells (6).")
        flip_p: float = Field(0.5, ge=0, le=1, description="Horizontal-flip probability of every view.")
        n_prototypes: int = Field(4, ge=1, description="K prototypes per slide (NSCLC 4, BRCA 2).")
        min_regions: int = Field(32, ge=1, description="n_min: slides with fewer regions get no prototypes (NSCLC 32, BRCA 16).")
        n_neighbours: int = Field(1, ge=1, description="r nearest slides for the inter-slide term (1).")
        warm_epoch: int = Field(20, ge=-1, description="Clustering runs at the start of every epoch > warm_epoch (20).")
        loss_type: Literal["all", "intra_inter", "intra", "inter"] = Field(
            "all", description="Prototype terms: all (= the code's intra_inter), intra or inter.")
        lambda_intra: float = Field(1.0, ge=0, description="Weight of L_intra.")
        lambda_inter: float = Field(1.0, ge=0, description="Weight of L_inter.")
        which_feat_to_cluster: Literal["bottleneck", "backbone"] = Field(
            "bottleneck", description="Cluster the normalised head bottleneck (code default) or the backbone [CLS].")
        cross_assign: Literal["nearest", "matched", "region"] = Field(
            "nearest", description="Neighbour target: nearest prototype to the region's own (code), the matching's "
                                   "permutation, or the prototype nearest to the region [ours].")
        skip_same_view: bool = Field(True, description="Replicate the code's quirk: view i left out for target chunk i.")
        matching: Literal["auto", "permutations", "hungarian"] = Field(
            "auto", description="Set-similarity solver: K! permutations (code; auto for K <= 6) or Hungarian.")
        kmeans_iters: int = Field(10, ge=1, description="k-means iterations (faiss niter 10).")
        kmeans_redo: int = Field(5, ge=1, description="k-means restarts, best inertia kept (faiss nredo 5).")
        kmeans_seed: int = Field(0, description="k-means seed (0).")
        cluster_batch_size: int = Field(256, ge=1, description="Regions per teacher forward in the clustering pass.")

    # ------------------------------------------------------------------------------------------ setup

    def setup(self, encoder: "nn.Module", ctx: PretrainContext) -> None:
        from histobench.ssl.dino import build_student_teacher
        from histobench.ssl.losses import DINOLoss
        from histobench.ssl.teacher import set_drop_path
        from histobench_slpd.loss import SLPDLoss
        from histobench_slpd.views import SLPDGridViews

        o = self.options
        self.ctx = ctx
        self.student, self.ema = build_student_teacher(encoder, o, ctx.total_steps, ctx.device)
        self.teacher = self.ema.module
        set_drop_path(encoder, o.drop_path_rate)  # the option's rate, 0 included
        self.loss = DINOLoss(o.out_dim, o.student_temp, o.center_momentum).to(ctx.device)
        self.proto_loss = SLPDLoss(o.out_dim, o.student_temp, o.center_momentum, o.loss_type, o.lambda_intra,
                                   o.lambda_inter, o.skip_same_view).to(ctx.device)
        self.views = SLPDGridViews(o.global_crop_size, o.local_crop_size, o.n_local_crops, o.flip_p)
        self.freeze_last_layer_steps = int(round(o.freeze_last_layer_epochs * ctx.steps_per_epoch))
        self.clusters: dict[str, Any] | None = None  # the per-epoch slide structure (see _cluster)
        self.offsets: "torch.Tensor | None" = None

    def student_modules(self) -> dict[str, "nn.Module"]:
        return {"backbone": self.student.backbone, "head": self.student.head}

    # -------------------------------------------------------------------------------- epoch: clustering

    @staticmethod
    def _slide_labels(ctx: PretrainContext, dataset: Any):
        labels = ctx.extra.get("slide_labels")
        return labels if labels is not None else getattr(dataset, "slide_labels", None)

    def on_epoch_start(self, epoch: int, loader: Any = None) -> dict[str, float] | None:
        """From epoch ``warm_epoch + 1`` on: recluster and return diagnostics; before: nothing (pure DINO)."""
        import torch

        from histobench_slpd.data import slide_offsets

        if loader is None or epoch <= self.options.warm_epoch:
            return None
        self.offsets = torch.as_tensor(slide_offsets(loader.slide_index), device=self.ctx.device)
        if self.clusters is not None and self.clusters["epoch"] == epoch:
            return None  # resumed inside an epoch whose clustering the checkpoint holds
        return self._cluster(epoch, loader)

    @staticmethod
    def _grids(dataset: Any, lo: int, hi: int):
        import torch

        if isinstance(getattr(dataset, "grids", None), torch.Tensor):
            return dataset.grids[lo:hi]
        return torch.stack([torch.as_tensor(dataset[i][0]) for i in range(lo, hi)])

    def embed_regions(self, dataset: Any) -> "torch.Tensor":
        """Teacher features of every region's centre crop, ``[R, d]`` on the CPU (no grad, eval mode)."""
        import torch
        import torch.nn.functional as F

        o = self.options
        was_training = self.teacher.training
        self.teacher.eval()
        feats = []
        with torch.no_grad(), torch.autocast(self.ctx.device.type, dtype=torch.bfloat16,
                                             enabled=self.ctx.device.type == "cuda"):
            for lo in range(0, len(dataset), o.cluster_batch_size):
                x = self._grids(dataset, lo, min(lo + o.cluster_batch_size, len(dataset))).to(self.ctx.device).float()
                h = self.teacher.backbone(self.views.eval_view(x))
                z = F.normalize(self.teacher.head.mlp(h), dim=-1) if o.which_feat_to_cluster == "bottleneck" else h
                feats.append(z.float().cpu())
        self.teacher.train(was_training)
        return torch.cat(feats)

    def _cluster(self, epoch: int, dataset: Any) -> dict[str, float]:
        import numpy as np
        import torch

        from histobench_slpd import clustering as C

        o = self.options
        t0 = time.perf_counter()
        offsets = self.offsets.cpu().numpy()
        feats = self.embed_regions(dataset).numpy()
        sc = C.cluster_slides(feats, offsets, o.n_prototypes, o.min_regions, o.kmeans_iters, o.kmeans_redo, o.kmeans_seed)
        sim = C.set_similarity(sc.prototypes, o.matching)
        nbr = C.nearest_slides(sim, sc.eligible, o.n_neighbours)
        cmap = C.cross_map(sc.prototypes, nbr, "matched" if o.cross_assign == "matched" else "nearest")
        slide_of_region = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        cross = C.region_cross_targets(feats, slide_of_region, sc.assignment, sc.prototypes, nbr, cmap, o.cross_assign)

        diag: dict[str, float] = {
            "eligible_slides": float(sc.eligible.sum()),
            "skipped_slides": float((~sc.eligible).sum()),
            "eligible_regions": float((sc.assignment >= 0).mean()) if len(sc.assignment) else 0.0,
        }
        if self.clusters is not None:
            old = C.SlideClusters(self.clusters["centroids"].cpu().numpy(), self.clusters["prototypes"].cpu().numpy(),
                                  self.clusters["assignment"].cpu().numpy(), self.clusters["eligible"].cpu().numpy())
            if len(old.assignment) == len(sc.assignment):
                diag.update(C.assignment_stability(old, sc, offsets))
        labels = self._slide_labels(self.ctx, dataset)
        if labels is not None:
            labels = np.asarray(labels)
            has = nbr[:, 0] >= 0
            if has.any():
                diag["nn_same_label"] = float((labels[has] == labels[nbr[has, 0]]).mean())
                _, counts = np.unique(labels[has], return_counts=True)
                diag["nn_same_label_chance"] = float(((counts / counts.sum()) ** 2).sum())
        diag["cluster_seconds"] = time.perf_counter() - t0

        dev = self.ctx.device
        self.clusters = {
            "epoch": epoch,
            "centroids": torch.as_tensor(sc.centroids, device=dev),
            "prototypes": torch.as_tensor(sc.prototypes, device=dev),
            "assignment": torch.as_tensor(sc.assignment, device=dev),
            "eligible": torch.as_tensor(sc.eligible, device=dev),
            "similarity": torch.as_tensor(sim, dtype=torch.float32, device=dev),
            "neighbours": torch.as_tensor(nbr, device=dev),
            "cross_map": torch.as_tensor(cmap, device=dev),
            "cross_targets": torch.as_tensor(cross, device=dev),
        }
        return diag

    # ------------------------------------------------------------------------------------------- step

    def _generator(self, step: int) -> "torch.Generator":
        from histobench.ssl.steps import step_generator

        return step_generator(self.ctx.seed, step, self.ctx.rank, self.ctx.device)

    def prototype_logits(self, slides: "torch.Tensor", protos: "torch.Tensor") -> "torch.Tensor":
        """Teacher targets ``u(p)`` of the prototypes ``protos`` of ``slides`` (``[M]`` each): ``[M, out_dim]``."""
        import torch
        import torch.nn.functional as F

        c = self.clusters
        with torch.no_grad():
            if self.options.which_feat_to_cluster == "bottleneck":
                p = c["prototypes"][slides, protos]
                return F.linear(F.normalize(p, dim=-1), self.teacher.head.last_layer_weight())
            return self.teacher.head(c["centroids"][slides, protos])  # backbone space: the whole head [ours]

    def _targets(self, slide: "torch.Tensor", region: "torch.Tensor"):
        """``(intra, inter)`` as :class:`~histobench_slpd.loss.SLPDLoss` takes them, or ``(None, None)``."""
        c = self.clusters
        if c is None:
            return None, None
        row = self.offsets[slide] + region
        k = c["assignment"][row]
        keep = k >= 0
        intra = (keep, self.prototype_logits(slide[keep], k[keep]))
        nbr = c["neighbours"][slide]  # [B, r]
        cross = c["cross_targets"][row]  # [B, r]
        keep2 = keep & (nbr >= 0).all(1) & (cross >= 0).all(1)
        inter = (keep2, [self.prototype_logits(nbr[keep2, i], cross[keep2, i]) for i in range(nbr.shape[1])])
        return intra, inter

    def training_step(self, batch: dict[str, "torch.Tensor"], step: int) -> dict[str, Any]:
        import torch

        o = self.options
        views = self.views(batch["grids"].float(), self._generator(step))
        with torch.no_grad():
            teacher_out = self.teacher.forward_views(views[:self.views.n_global])
        student_out = self.student.forward_views(views)
        loss_self, stats = self.loss(student_out, teacher_out, o.teacher_temp)
        out = {"loss_self": loss_self.detach(), "teacher_entropy": stats["teacher_entropy"],
               "momentum": self.ema.momentum(step)}
        intra, inter = self._targets(batch["slide_index"], batch["tile_index"])
        if intra is None:  # warm-up: exactly DINO
            zero = loss_self.new_zeros(())
            return {"loss": loss_self, **out, "loss_intra": zero, "loss_inter": zero}
        proto, terms = self.proto_loss(student_out, intra, inter, o.teacher_temp)
        return {"loss": loss_self + proto, **out, **terms}

    def before_optimizer_step(self, step: int) -> None:
        from histobench.ssl.teacher import cancel_last_layer_grads

        cancel_last_layer_grads(self.student.head, step, self.freeze_last_layer_steps)

    def after_optimizer_step(self, step: int) -> None:
        self.ema.update(self.student, step)

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "loss": self.loss.state_dict(), "proto_loss": self.proto_loss.state_dict(),
                "clusters": None if self.clusters is None else dict(self.clusters)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.loss.load_state_dict(state["loss"])
        self.proto_loss.load_state_dict(state["proto_loss"])
        clusters = state.get("clusters")
        self.clusters = None if clusters is None else {
            k: (v.to(self.ctx.device) if hasattr(v, "to") else v) for k, v in clusters.items()}

    def trained_encoder(self) -> "nn.Module":
        return self.teacher.backbone
