"""HLSS: hierarchical language-tied self-supervision (Watawana, Ranasinghe, Mahmood, Naseer, Khan, Khan,
"Hierarchical Text-to-Vision Self Supervised Alignment for Improved Histopathology Representation Learning",
MICCAI 2024, arXiv:2403.14616; code Hasindri/HLSS), on the patient-slide-patch hierarchy of HiDisc (Jiang et al.,
CVPR 2023, arXiv:2303.01605). Spec: ``/work/shared/methods/hlss.md``.

One step (spec §2.7): a batch of ``B`` patients x ``S`` slides x ``P`` tiles (the core's
:class:`~histobench.pretrain.samplers.PatientSampler`, ``[patient, slide, tile]`` order, wrap-around for small
patients and slides) gets ``T`` augmented views per tile, made on the device; the backbone embeds them,
``z`` = the L2-normalised embedding; an adapter maps ``z`` into the text space when the text encoder does not
share the image space (:mod:`~histobench_hlss.heads`); three text-initialised heads give the level embeddings;
under ``torchrun`` everything is all-gathered (:func:`~histobench_hlss.loss.gather_with_grad`), and the loss
(:func:`~histobench_hlss.loss.hlss_loss`) is SupCon per level (patch ``[B*S*P, T]``, slide ``[B*S, P*T]``,
patient ``[B, S*P*T]``; tau = base tau = 0.07, lambda 1/1/1) plus the alignment term (symmetric KL to each view's
nearest attribute, summed; with gradient by default, ``ha_gradient=false`` for the released code's constant).

Text banks: in ``setup``, from ``ctx.text_encoder`` and the descriptions of the task whose cohort is pretrained
on (``ctx.cohort.task``) or ``descriptions`` (a shipped task name or a file), via
:func:`histobench_hlss.textbank.text_banks`, cached in the work directory (``ctx.cache_dir/textbanks``, one file
per descriptions hash and text-encoder identity, hash-checked on load), so the text tower runs once per pair.
A cohort that names no task (synthetic contract checks) uses a small generic H&E set written here, with a warning.

Open points of the spec, as options with the released code's choices as defaults: ``ha_match`` (``per_view`` |
``group_mean``, P3), ``ha_reduction`` (``sum`` | ``mean``, P2), ``ha_temperature`` (1, P2), and
``balance_labels``, a labels CSV that turns on the class-balanced replication of patients (P9,
:mod:`~histobench_hlss.balance`). A patient of the cohort without tiles is an error naming it.

Views (spec §2.1, the H&E-sensible part of the released list, each drawn per image with p = ``aug_p`` (0.5; the
released config's 0.3 is never read, P7)): a random resized crop (scale 0.08-1, else a plain resize), horizontal
and vertical flips, additive Gaussian noise (sd ~ U[0.01, 0.1]), autocontrast, sharpness x2, Gaussian blur
(kernel 5, sigma 1), random erasing (area 0.02-0.33). Left out: the no-op colour jitter, solarize at 0.2 (it
inverts most of a bright H&E tile) and the small affine (the crop and flips cover it). Normalised with the
encoder's mean and std (CLIP's for ``clip-rn50``; the released code feeds unnormalised pixels, P7).

Optimiser (``train_defaults``): AdamW with peak lr 1e-3 over 32 patients, weight decay 0.01 (constant), linear
warm-up over the first 10 % of steps then a half cosine to 0, no gradient clipping. The trainer scales
``train.lr`` by ``batch_size / 256`` with ``batch_size`` counted in patients here, so ``train.lr`` = 8e-3 gives
1e-3 at 32 patients. Harness differences: no weight decay on biases and norms (the trainer's parameter groups);
the paper's 40,000 "epochs" of a few steps each become ``train.epochs`` passes over the patients.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from histobench.components import PretrainContext, Pretext
from histobench.errors import HistobenchError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

LEVELS = ("patch", "slide", "patient")

DEVIATION_ADAPTER = ("text encoder {name!r} does not share the image encoder's space: HLSS adds a trainable "
                     "Linear({d_v} -> {d_t}) adapter before its heads, which the paper (CLIP's joint space) does not have")

# Used only when the pretraining cohort names no task (synthetic data): a few generic H&E attributes per level.
GENERIC_LEVELS: dict[str, dict[str, list[str]]] = {
    "patch": {
        "Nuclear pleomorphism": ["Nuclei vary in size and shape in the pathology image.",
                                 "Pleomorphic nuclei are evident in the tissue patch."],
        "Hyperchromatic nuclei": ["Darkly stained hyperchromatic nuclei are visible.",
                                  "The nuclei are hyperchromatic in the pathology image."],
        "Eosinophilic cytoplasm": ["Abundant pink cytoplasm is evident in the patch.",
                                   "Cells show eosinophilic cytoplasm."],
        "Mitotic figures": ["Mitotic figures are present in the tissue.", "Dividing cells are visible in the patch."],
    },
    "slide": {
        "Stromal desmoplasia": ["Dense fibrous stroma surrounds the tumour.", "Desmoplastic stroma is evident."],
        "Necrosis": ["Areas of necrosis are present in the slide.", "Necrotic debris is evident in the tissue."],
        "Immune infiltrate": ["Lymphocytes infiltrate the tissue.", "An inflammatory infiltrate is evident."],
        "Glandular architecture": ["Tumour cells form glands.", "Gland-like structures are evident in the slide."],
    },
    "patient": {
        "Tumour heterogeneity": ["The tumour looks different from region to region.",
                                 "Marked heterogeneity is evident across the tumour."],
        "High cellularity": ["The tumour is densely cellular throughout.", "High overall cellularity is evident."],
        "Infiltrative growth": ["The tumour grows in an infiltrative pattern.", "Infiltrative margins are evident."],
        "Solid growth": ["Tumour cells grow in solid sheets.", "A solid growth pattern is evident."],
    },
}


class HLSS(Pretext):
    """HLSS (Watawana et al., MICCAI 2024): per-level SupCon in text-initialised head spaces plus text alignment."""

    name = "hlss"
    requires = frozenset({"tiles", "hierarchy", "text"})
    default_encoder = "clip-rn50"
    default_text_encoder = "openclip"
    # The demo must run offline from a fresh clone without optional extras: the core's hashing encoder.
    demo_text_encoder = "hashing"
    ddp_static_graph = True  # every step runs the backbone, the adapter (if any) and all three heads
    train_defaults = {"epochs": 100, "batch_size": 32, "lr": 8e-3, "min_lr": 0.0, "warmup_epochs": 10,
                      "weight_decay": 0.01, "weight_decay_end": 0.01, "clip_grad": 0.0}
    train_presets = {"demo": {"epochs": 4, "batch_size": 4, "lr": 8e-3 * 8, "warmup_epochs": 0.4,
                              "num_workers": 0, "max_tiles_per_slide": 32}}
    presets = {"demo": {"view_size": 32}}  # demo tiles are 64 px; 32 px views keep the CPU demo short

    class Options(Pretext.Options):
        descriptions: str | None = Field(None, description="Task name or descriptions file for the text banks "
                                         "(default: the task whose cohort is pretrained on).")
        slides: int = Field(2, ge=1, description="S: slides per patient per step (HiDisc/HLSS: 2).")
        patches: int = Field(2, ge=1, description="P: tiles per slide per step (2).")
        views: int = Field(2, ge=2, description="T: augmented views per tile (2).")
        view_size: int = Field(224, ge=8, description="Side of each view in pixels (224).")
        aug_p: float = Field(0.5, ge=0, le=1, description="Probability of each augmentation (released code: 0.5).")
        tau: float = Field(0.07, gt=0, description="SupCon temperature (0.07).")
        base_tau: float = Field(0.07, gt=0, description="SupCon base temperature; the loss is scaled by tau/base_tau.")
        lambda_patch: float = Field(1.0, ge=0, description="Weight of the patch-level SupCon term.")
        lambda_slide: float = Field(1.0, ge=0, description="Weight of the slide-level SupCon term.")
        lambda_patient: float = Field(1.0, ge=0, description="Weight of the patient-level SupCon term.")
        ha_weight: float = Field(1.0, ge=0, description="Weight of the hierarchical alignment term L_HA.")
        ha_gradient: bool = Field(True, description="True: L_HA trains (the paper's objective); false: its value is "
                                  "added without gradient (the released code's .item()).")
        heads_trainable: bool = Field(True, description="Train the text-initialised heads (HLSS: yes).")
        adapter: Literal["auto", "on", "off"] = Field("auto", description="Adapter Linear(d_v -> d_t): auto = when "
                                                      "the text encoder does not share the image space.")
        ha_match: Literal["per_view", "group_mean"] = Field(
            "per_view", description="L_HA matching: every view (released code) or, per level, the re-normalised mean "
            "of each tile's / slide's / patient's views (spec P3).")
        ha_reduction: Literal["sum", "mean"] = Field(
            "sum", description="L_HA over the matched vectors: sum (released code; grows with the batch) or mean (P2).")
        ha_temperature: float = Field(1.0, gt=0, description="Temperature of L_HA's softmaxes over the feature "
                                      "coordinates (released code: 1).")
        balance_labels: str | None = Field(None, description="CSV with label and case_id (or slide_id) columns, e.g. "
                                           "the task's manifest: replicate patients per class up to the largest "
                                           "class (HiDisc/HLSS balance_study_per_class; uses labels, spec P9).")

    # ----------------------------------------------------------------------------------------- shape

    def hierarchy_shape(self) -> tuple[int, int]:
        return (self.options.slides, self.options.patches)

    def batch_sampler(self, dataset: Any, cohort: Any, batch_size: int, seed: int) -> Any:
        """The core's whole-patient sampler; a patient without tiles is an error naming it; with
        ``balance_labels``, the patients are replicated per class (:mod:`~histobench_hlss.balance`)."""
        sampler = super().batch_sampler(dataset, cohort, batch_size, seed)
        empty = list(getattr(sampler, "empty_patients", ()))
        if empty:
            slides = [sid for sid, pid in zip(cohort.slide_ids, cohort.patient_ids) if pid == empty[0]]
            more = f" (and {len(empty) - 1} more patients)" if len(empty) > 1 else ""
            raise HistobenchError(f"hlss: patient {empty[0]!r} has no tiles in its slides ({', '.join(slides)}){more}; "
                                  f"remove it from the cohort or check its tissue masks")
        if self.options.balance_labels:
            from histobench_hlss.balance import balance_sampler, patient_classes

            sampler = balance_sampler(sampler, patient_classes(self.options.balance_labels, cohort), seed)
        return sampler

    # ----------------------------------------------------------------------------------------- setup

    def descriptions_for(self, task: str | None):
        """The validated description set this run uses (option, else the cohort's task, else the generic set)."""
        from histobench_hlss.descriptions import Descriptions, load_descriptions, shipped_tasks

        name = self.options.descriptions or task
        if name is None:
            warnings.warn("hlss: the pretraining cohort names no task and pretext.descriptions is unset; "
                          "using histobench's small generic H&E descriptions", stacklevel=2)
            return Descriptions(task="generic", levels=GENERIC_LEVELS, source="histobench_hlss.pretext.GENERIC_LEVELS")
        looks_like_file = any(ch in str(name) for ch in "/\\") or str(name).endswith((".yaml", ".yml", ".json"))
        if not looks_like_file and name not in shipped_tasks():
            origin = "pretext.descriptions" if self.options.descriptions else f"the cohort's task {name!r}"
            raise HistobenchError(f"hlss: no descriptions file for {name!r} ({origin}); shipped: "
                                  f"{', '.join(shipped_tasks()) or 'none'}; set -o pretext.descriptions=TASK_OR_FILE")
        return load_descriptions(name)

    def setup(self, encoder: "nn.Module", ctx: PretrainContext) -> None:
        import torch

        from histobench_hlss.heads import TextHeads
        from histobench_hlss.textbank import text_banks

        o = self.options
        if ctx.text_encoder is None:
            raise HistobenchError("hlss requires a text encoder (--text-encoder NAME)")
        self.ctx, self.encoder = ctx, encoder
        desc = self.descriptions_for(ctx.cohort.task if ctx.cohort is not None else None)
        cache_dir = getattr(ctx, "cache_dir", None)
        banks = text_banks(desc, ctx.text_encoder, Path(cache_dir) / "textbanks" if cache_dir is not None else None)
        self.bank_names = {lvl: list(banks[lvl].names) for lvl in LEVELS}
        self.descriptions_task, self.descriptions_sha256 = desc.task, desc.sha256
        vectors = {lvl: banks[lvl].vectors.float() for lvl in LEVELS}
        d_v, d_t = int(encoder.embed_dim), int(vectors["patch"].shape[1])
        shares = bool(ctx.text_encoder.shares_image_space)  # the instance's: a ``cached`` bank knows its writer's
        use_adapter = o.adapter == "on" or (o.adapter == "auto" and (not shares or d_v != d_t))
        if not use_adapter and d_v != d_t:
            raise HistobenchError(f"hlss: the image embedding ({d_v}) and the text space ({d_t}) differ; "
                                  f"set -o pretext.adapter=auto")
        self.adapter_used = use_adapter
        self.deviation = (DEVIATION_ADAPTER.format(name=ctx.text_encoder.name, d_v=d_v, d_t=d_t)
                          if use_adapter else "")
        if self.deviation:
            warnings.warn(f"hlss: {self.deviation}", stacklevel=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed + 7)
            self.heads = TextHeads(vectors, d_v, use_adapter).to(ctx.device)
        for p in self.heads.heads.parameters():
            p.requires_grad_(o.heads_trainable)
        t = ctx.encoder_component.transform()
        self.mean, self.std = tuple(t.mean), tuple(t.std)

    def student_modules(self) -> dict[str, "nn.Module"]:
        return {"encoder": self.encoder, "heads": self.heads}

    # ------------------------------------------------------------------------------------------ views

    def make_views(self, images: "torch.Tensor", generator: "torch.Generator | None") -> "torch.Tensor":
        """``T`` views of every image, ``[N*T, 3, s, s]`` with an image's views next to each other."""
        from histobench_hlss.views import hlss_views

        o = self.options
        return hlss_views(images, o.views, o.view_size, o.aug_p, self.mean, self.std, generator)

    # ------------------------------------------------------------------------------------------- step

    def embed(self, views: "torch.Tensor"):
        """``(u [N, d_t], heads {level: [N, K]})`` of a batch of views."""
        import torch

        z = torch.nn.functional.normalize(self.encoder(views).float(), dim=1)
        return self.heads(z)

    def training_step(self, batch: dict[str, "torch.Tensor"], step: int) -> dict[str, Any]:
        from histobench.ssl.steps import step_generator
        from histobench_hlss.loss import gather_with_grad, hlss_loss

        o = self.options
        images = batch["images"]
        per_patient = o.slides * o.patches
        if images.shape[0] % per_patient:
            raise HistobenchError(f"hlss: a batch of {images.shape[0]} tiles is not whole patients of "
                                  f"{o.slides} x {o.patches}")
        generator = step_generator(self.ctx.seed, step, self.ctx.rank, images.device)
        u, heads = self.embed(self.make_views(images, generator))
        u = gather_with_grad(u)
        heads = {lvl: gather_with_grad(h) for lvl, h in heads.items()}
        b = u.shape[0] // (per_patient * o.views)
        out = hlss_loss(u, heads, {lvl: self.heads.bank(lvl) for lvl in LEVELS}, (b, o.slides, o.patches, o.views),
                        tau=o.tau, base_tau=o.base_tau,
                        lambdas={"patch": o.lambda_patch, "slide": o.lambda_slide, "patient": o.lambda_patient},
                        ha_weight=o.ha_weight, ha_gradient=o.ha_gradient, ha_match=o.ha_match,
                        ha_reduction=o.ha_reduction, ha_temperature=o.ha_temperature)
        out["deviation_adapter"] = 1.0 if self.adapter_used else 0.0  # logged (train/deviation_adapter): 1 = the adapter, not in the paper
        return out

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        # attribute names and the descriptions' hash travel with the heads (plain data), for the attribute analysis
        return {"encoder": self.encoder.state_dict(), "heads": self.heads.state_dict(),
                "bank_names": {lvl: list(v) for lvl, v in self.bank_names.items()},
                "descriptions": {"task": self.descriptions_task, "sha256": self.descriptions_sha256},
                "adapter": bool(self.adapter_used)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self.heads.load_state_dict(state["heads"])

    def trained_encoder(self) -> "nn.Module":
        return self.encoder
