"""Component contracts: the small base classes every plugin component subclasses.

A component class carries a ``name`` (lowercase, hyphenated), optional ``aliases``, a pydantic ``Options``
model whose defaults come from its paper, and ``presets``: named partial option sets (``"demo"`` is the
scaled-down CPU setting that ``--demo`` and the contract checks use). Components are registered as classes
and instantiated by :func:`histobench.create` with validated options.

Nothing here imports torch: the ``build`` methods import it when they run.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch
    from torch import nn


class StrictOptions(BaseModel):
    """Base for every ``Options`` model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Component:
    """Base of every component kind."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    class Options(StrictOptions):
        pass

    def __init__(self, options: "Component.Options | dict[str, Any] | None" = None, **overrides: Any):
        if isinstance(options, BaseModel):
            options = options.model_dump()
        self.options = self.Options(**{**(options or {}), **overrides})

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        doc = inspect.getdoc(cls) or ""
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def preset(cls, name: str | None) -> dict[str, Any]:
        """The named partial option set, or ``{}``."""
        return dict(cls.presets.get(name, {})) if name else {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


# --------------------------------------------------------------------------------------------- encoders


@dataclass(frozen=True)
class InputTransform:
    """How pixels must look when they reach an encoder: square size and normalisation."""

    size: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


class Encoder(Component):
    """A patch or region encoder.

    ``build()`` returns an ``nn.Module`` with an ``embed_dim`` attribute and ``forward(x) -> [B, D]``;
    dense methods also need ``forward_tokens(x) -> [B, T, D]``. ``input_kind`` says what ``x`` is:
    ``"pixels"`` (normalised float images ``[B, 3, S, S]``, see :meth:`transform`) or ``"grid"``
    (a grid of patch embeddings ``[B, D_in, h, w]``, for region encoders).
    """

    kind = "encoder"
    input_kind: ClassVar[Literal["pixels", "grid"]] = "pixels"

    def build(self) -> "nn.Module":
        raise NotImplementedError

    def transform(self) -> InputTransform:
        raise NotImplementedError

    def weights_tag(self) -> str:
        """A short human-readable tag of where the weights came from (``random``, a file, a hub id)."""
        return "random"


# --------------------------------------------------------------------------------------------- pretexts


class TrainOptions(StrictOptions):
    """The one training loop's policy. Pretexts give paper defaults in ``Pretext.train_defaults``."""

    epochs: int = Field(100, ge=1, description="Training epochs.")
    batch_size: int = Field(256, ge=1, description="Samples per optimizer step (global, over all ranks).")
    lr: float = Field(5e-4, gt=0, description="Peak learning rate for batch size 256 (scaled linearly).")
    min_lr: float = Field(1e-6, ge=0, description="Final learning rate of the cosine schedule.")
    warmup_epochs: float = Field(10, ge=0, description="Linear learning-rate warm-up, in epochs.")
    weight_decay: float = Field(0.04, ge=0, description="Initial weight decay (cosine schedule).")
    weight_decay_end: float = Field(0.4, ge=0, description="Final weight decay.")
    clip_grad: float = Field(3.0, ge=0, description="Gradient-norm clip; 0 disables.")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto = bf16 autocast on CUDA.")
    compile: bool = Field(False, description="torch.compile the trainable modules.")
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: at each epoch end).")
    num_workers: int = Field(2, ge=0, description="Tile-decoding worker processes.")
    max_tiles_per_slide: int = Field(0, ge=0, description="Cap on tiles per slide for pretraining (0: all).")
    steps_per_epoch: int = Field(0, ge=0, description="Cap on steps per epoch (0: one pass over the data).")


@dataclass
class PretrainContext:
    """What the training loop tells a pretext in ``setup``."""

    device: "torch.device"
    total_steps: int
    steps_per_epoch: int
    epochs: int
    batch_size: int
    encoder_component: Encoder
    seed: int = 0
    world_size: int = 1
    rank: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Pretext(Component):
    """A self-supervised pretext task. It registers components; it never writes its own loop.

    The loop calls, in order: ``setup(encoder, ctx)`` once; per epoch ``on_epoch_start(epoch, loader)``;
    per step ``training_step(batch, step)`` (returns a dict with a scalar ``loss`` tensor and any other
    values to log), backward, ``before_optimizer_step(step)``, the optimizer step,
    ``after_optimizer_step(step)`` (e.g. an EMA update). ``student_modules()`` are what the optimizer
    updates; ``state_dict()`` is what a checkpoint stores; ``trained_encoder()`` is the encoder that
    downstream extraction uses.

    ``batch`` holds ``images``: uint8 ``[B, 3, H, W]`` already on the training device (views and
    augmentation are made there, on whole batches), plus ``slide_index`` and ``tile_index`` (``[B]``
    long tensors). Region-level pretexts (``requires`` contains ``regions``) get ``grids`` instead: float
    patch-embedding grids ``[B, D, h, w]``. ``on_epoch_start`` receives the whole dataset (``len``,
    ``__getitem__`` -> ``(x, slide_index, tile_index)``, and a ``slide_index`` array) for per-epoch passes
    such as re-clustering. ``requires`` names what data the pretext needs: ``tiles``, ``regions``,
    ``hierarchy``, ``masks`` or ``text``.
    """

    kind = "pretext"
    requires: ClassVar[frozenset[str]] = frozenset({"tiles"})
    default_encoder: ClassVar[str] = "timm"  # used when the user names no --encoder
    train_defaults: ClassVar[dict[str, Any]] = {}
    train_presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # Under torchrun: does every step use the same parameters of student_modules()? True lets
    # DistributedDataParallel learn the unused ones on the first step (static_graph); False (safe for
    # steps that differ) makes it walk each step's autograd graph to find them.
    ddp_static_graph: ClassVar[bool] = False

    def setup(self, encoder: "nn.Module", ctx: PretrainContext) -> None:
        raise NotImplementedError

    def student_modules(self) -> dict[str, "nn.Module"]:
        raise NotImplementedError

    def training_step(self, batch: dict[str, "torch.Tensor"], step: int) -> dict[str, Any]:
        raise NotImplementedError

    def on_epoch_start(self, epoch: int, loader: Any = None) -> dict[str, float] | None:
        return None

    def before_optimizer_step(self, step: int) -> None:
        return None

    def after_optimizer_step(self, step: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def trained_encoder(self) -> "nn.Module":
        raise NotImplementedError

    @classmethod
    def train_options(cls, preset: str | None = None, **overrides: Any) -> TrainOptions:
        """The resolved training policy: paper defaults, then the preset, then overrides."""
        return TrainOptions(**{**cls.train_defaults, **cls.train_presets.get(preset or "", {}), **overrides})


# ------------------------------------------------------------------------------------------ aggregators


class Aggregator(Component):
    """A slide-level head over a bag of tile embeddings.

    ``build(in_dim, n_outputs)`` returns an ``nn.Module`` whose ``forward(x, mask)`` takes padded bags
    ``x [B, N, D]`` and a boolean ``mask [B, N]`` (True = real tile) and returns ``(out [B, n_outputs],
    attention [B, N] or None)``. ``out`` is logits for classification, hazard logits for discrete-time
    survival, a single risk for Cox models.
    """

    kind = "aggregator"

    def build(self, in_dim: int, n_outputs: int) -> "nn.Module":
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ tasks


class Task(Component):
    """A downstream task: a cohort, its labels, tiling, split protocol and metrics.

    ``cohort(data_root)`` returns the manifest (one row per slide: ``slide_id, case_id, path`` and the
    label columns); ``demo_cohort(out_dir, seed)`` writes a synthetic stand-in of the same shape and
    returns its manifest.
    """

    kind = "task"
    task_kind: ClassVar[Literal["subtyping", "grading", "survival"]] = "subtyping"
    classes: ClassVar[tuple[str, ...]] = ()
    metrics: ClassVar[tuple[str, ...]] = ()
    primary_metric: ClassVar[str] = ""
    default_aggregator: ClassVar[str] = "abmil"
    license: ClassVar[str] = ""
    # The evaluation policy (``EvalOptions`` fields) for this task, and for its presets. The same for every
    # method on the task; ``-o eval.NAME=VALUE`` overrides it for one run (and is logged).
    eval_defaults: ClassVar[dict[str, Any]] = {}
    eval_presets: ClassVar[dict[str, dict[str, Any]]] = {"demo": {"epochs": 40, "lr": 1e-3}}

    class Options(StrictOptions):
        mpp: float = Field(0.5, gt=0, description="Target microns per pixel of the tiles.")
        tile_size: int = Field(256, ge=8, description="Tile side in pixels at the target µm/px.")
        min_tissue: float = Field(0.5, ge=0, le=1, description="Minimum tissue fraction of a kept tile.")
        folds: int = Field(10, ge=2, description="Patient-level stratified folds.")
        max_tiles_per_slide: int = Field(0, ge=0, description="Cap on tiles per slide (0: all).")

    def cohort(self, data_root: Path) -> "pd.DataFrame":
        raise NotImplementedError

    def demo_cohort(self, out_dir: Path, seed: int = 0) -> "pd.DataFrame":
        raise NotImplementedError


# ------------------------------------------------------------------------------------ segmenters, text


class Segmenter(Component):
    """A nuclei segmenter: ``segment(tile uint8 [H, W, 3]) -> (instances int32 [H, W], types or None)``."""

    kind = "segmenter"

    def segment(self, tile: Any) -> tuple[Any, Any | None]:
        raise NotImplementedError


class TextEncoder(Component):
    """A text encoder: ``build()`` returns a module whose ``encode(list[str])`` gives ``[N, D]``."""

    kind = "text_encoder"

    def build(self) -> "nn.Module":
        raise NotImplementedError


BASES: dict[str, type[Component]] = {
    "encoder": Encoder,
    "pretext": Pretext,
    "aggregator": Aggregator,
    "task": Task,
    "segmenter": Segmenter,
    "text_encoder": TextEncoder,
}
HOOKS: dict[str, str] = {
    "encoder": "register_encoders",
    "pretext": "register_pretexts",
    "aggregator": "register_aggregators",
    "task": "register_tasks",
    "segmenter": "register_segmenters",
    "text_encoder": "register_text_encoders",
}
