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
    import numpy as np
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

    def check(self) -> None:
        """Cheap checks of the options that would otherwise fail only when the component is built (a name
        that does not exist, a missing file), run when a run is resolved, before any slide is read. Raise
        :class:`histobench.errors.HistobenchError` with one line; the default checks nothing."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


# --------------------------------------------------------------------------------------------- encoders


@dataclass(frozen=True)
class InputTransform:
    """How pixels must look when they reach an encoder: square size and normalisation."""

    size: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class GridGeometry:
    """What a ``grid`` (region) encoder reads: regions of ``grid x grid`` patches of ``patch_px`` pixels at
    ``patch_mpp`` µm/px (regions with at least ``min_tissue`` tissue), each patch embedded by the frozen patch
    encoder ``patch_encoder`` (a registered encoder name, with ``patch_encoder_options`` over its
    ``patch_encoder_preset``) into ``in_dim`` features; ``patch_pretext`` (a pretext name, or ``none``)
    pretrains that patch encoder first, in the same run."""

    patch_mpp: float
    patch_px: int
    grid: int
    min_tissue: float
    in_dim: int
    patch_encoder: str = "timm"
    patch_encoder_options: dict = field(default_factory=dict)
    patch_encoder_preset: str | None = None
    patch_pretext: str = "none"


class Encoder(Component):
    """A patch or region encoder.

    ``build()`` returns an ``nn.Module`` with an ``embed_dim`` attribute and ``forward(x) -> [B, D]``;
    dense methods also need ``forward_tokens(x) -> [B, T, D]`` with an int ``num_prefix_tokens`` attribute
    (class and register tokens come first), and ViTs expose ``cls_attention(x) -> [B, heads, N_patches]``.
    ``input_kind`` says what ``x`` is: ``"pixels"`` (normalised float images ``[B, 3, S, S]``, see
    :meth:`transform`) or ``"grid"`` (a grid of patch embeddings ``[B, D_in, h, w]``, for region encoders,
    which describe their input with :meth:`grid_geometry`).
    """

    kind = "encoder"
    input_kind: ClassVar[Literal["pixels", "grid"]] = "pixels"

    def grid_geometry(self) -> GridGeometry:
        """The regions and patch level a ``grid`` encoder reads (only grid encoders have one)."""
        raise NotImplementedError(f"encoder {self.name!r} reads {self.input_kind}, not region grids")

    def build(self) -> "nn.Module":
        raise NotImplementedError

    def transform(self) -> InputTransform:
        raise NotImplementedError

    def weights_tag(self) -> str:
        """A short human-readable tag of where the weights came from (``random``, a file, a hub id)."""
        return "random"

    def features_digest(self) -> str:
        """8 hex digits over what shapes this encoder's features besides its weights: every option (architecture,
        cut, pooling, final activation, model kwargs, ...) and the input transform (size, mean, std). The feature
        cache key carries it next to the weights hash, so two encoders that differ only there (the same weights
        cut with another pooling, or normalised otherwise) never share cached features, whatever weights tag
        the caller chose (a pretraining folder, a weights file)."""
        import hashlib
        import json

        try:
            t = self.transform()
            transform = [t.size, list(t.mean), list(t.std)]
        except NotImplementedError:  # grid encoders read patch embeddings, not pixels
            transform = None
        blob = json.dumps({"encoder": self.name, "options": self.options.model_dump(mode="json"), "transform": transform},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]


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


REQUIREMENTS = frozenset({"tiles", "regions", "masks", "hierarchy", "text"})


@dataclass(frozen=True)
class CohortMeta:
    """What pretraining may know of its cohort: per slide (in dataset slide-index order) its id and its
    patient, and the task whose cohort it is (e.g. to pick task descriptions); never a label.
    ``patient_index[s]`` numbers the patients 0..P-1 in order of first appearance."""

    slide_ids: tuple[str, ...]
    patient_ids: tuple[str, ...]
    task: str | None = None

    @property
    def patient_index(self) -> "np.ndarray":
        import numpy as np

        order = {p: i for i, p in enumerate(dict.fromkeys(self.patient_ids))}
        return np.array([order[p] for p in self.patient_ids], dtype=np.int64)

    @property
    def n_patients(self) -> int:
        return len(set(self.patient_ids))

    @classmethod
    def one_patient_per_slide(cls, n_slides: int) -> "CohortMeta":
        ids = tuple(f"slide-{i}" for i in range(n_slides))
        return cls(ids, ids)


@dataclass
class PretrainContext:
    """What the training loop tells a pretext in ``setup``.

    ``cohort`` names the slides and patients of the training data (no labels); ``text_encoder`` is the
    resolved :class:`TextEncoder` when the pretext requires ``text``; ``segmentation`` describes the nuclei
    masks' source (segmenter identity, type ids) when it requires ``masks``; ``cache_dir`` is a folder of the
    work directory for files a pretext may reuse across runs (e.g. HLSS's text banks), ``None`` outside a run.
    """

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
    cohort: CohortMeta | None = None
    text_encoder: "TextEncoder | None" = None
    segmentation: dict[str, Any] = field(default_factory=dict)
    cache_dir: Path | None = None


class Pretext(Component):
    """A self-supervised pretext task. It registers components; it never writes its own loop.

    The loop calls, in order: ``setup(encoder, ctx)`` once; per epoch ``on_epoch_start(epoch, loader)``;
    per step ``training_step(batch, step)`` (returns a dict with a scalar ``loss`` tensor and any other
    values to log), backward, ``before_optimizer_step(step)``, the optimizer step,
    ``after_optimizer_step(step)`` (e.g. an EMA update). ``student_modules()`` are what the optimizer
    updates; ``state_dict()`` is what a checkpoint stores; ``trained_encoder()`` is the encoder that
    downstream extraction uses.

    **Batches** are dicts; the loop moves every tensor in them to the training device. What they hold
    follows ``requires``, the set of inputs the pretext declares (a requirement no stage can meet is an
    error when the run is resolved, before any work):

    * ``tiles`` (default): ``images`` uint8 ``[B, 3, H, W]`` (views and augmentation are made on the device,
      on whole batches);
    * ``regions``: ``grids`` float patch-embedding grids ``[B, D, h, w]`` instead of ``images`` (a ``grid``
      encoder, e.g. HIPT's region ViT);
    * ``masks``: also ``instances`` int32 ``[B, H, W]`` (nuclei instance ids, 0 = none) and ``types`` uint8
      ``[B, H, W]`` (the segmenter's cell types, 0 where it gives none), from the segmentation stage's cache,
      pixel-aligned with ``images``;
    * ``hierarchy``: batches of whole patients: ``batch_size`` patients, each ``S`` slides x ``P`` tiles
      (:meth:`hierarchy_shape`), in ``[patient, slide, tile]`` order, so ``images.view(B, S, P, ...)`` groups
      them (a patient with fewer slides, a slide with fewer tiles, wraps around);
    * ``text``: ``ctx.text_encoder`` is set.

    Every batch also holds ``slide_index``, ``tile_index`` and ``patient_index`` (``[B]`` long tensors).
    :meth:`batch_sampler` chooses each epoch's batches (a seeded permutation of tiles by default, whole
    patients for ``hierarchy``); :meth:`collate` may replace the default stacking of items.
    ``on_epoch_start`` receives the whole dataset (``len``, ``__getitem__``, a ``slide_index`` array) for
    per-epoch passes such as re-clustering.
    """

    kind = "pretext"
    requires: ClassVar[frozenset[str]] = frozenset({"tiles"})
    default_encoder: ClassVar[str] = "timm"  # used when the user names no --encoder
    default_segmenter: ClassVar[str | None] = None  # for ``masks``: used when the user names no --segmenter
    demo_segmenter: ClassVar[str | None] = "oracle"  # ... with --demo (synthetic slides know their nuclei)
    default_text_encoder: ClassVar[str | None] = None  # for ``text``: used when the user names no --text-encoder
    demo_text_encoder: ClassVar[str | None] = "hashing"
    train_defaults: ClassVar[dict[str, Any]] = {}
    train_presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # Under torchrun: does every step use the same parameters of student_modules()? True lets
    # DistributedDataParallel learn the unused ones on the first step (static_graph); False (safe for
    # steps that differ) makes it walk each step's autograd graph to find them.
    ddp_static_graph: ClassVar[bool] = False

    def hierarchy_shape(self) -> tuple[int, int]:
        """``(S slides per patient, P tiles per slide)`` of ``hierarchy`` batches (HiDisc/HLSS: 2 x 2)."""
        return (2, 2)

    def batch_sampler(self, dataset: Any, cohort: CohortMeta, batch_size: int, seed: int) -> Any:
        """The epoch sampler (see :mod:`histobench.pretrain.samplers`): tiles, or whole patients for ``hierarchy``."""
        from histobench.pretrain.samplers import PatientSampler, TileSampler

        if "hierarchy" in self.requires:
            return PatientSampler(dataset.slide_index, cohort, batch_size, *self.hierarchy_shape(), seed=seed)
        return TileSampler(len(dataset), batch_size, seed)

    def collate(self, items: list[Any]) -> Any:
        """Items -> one batch; default: stack each field (``torch.utils.data.default_collate``)."""
        from torch.utils.data import default_collate

        return default_collate(items)

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


@dataclass(frozen=True)
class TileRef:
    """Where a tile comes from: what a segmenter may need besides its pixels (e.g. the ``oracle`` segmenter
    reads the synthetic slide's true maps at ``(x, y)``). Coordinates are level-0 pixels of the slide."""

    slide_id: str
    path: Path
    x: int
    y: int
    level: int
    read_size: int
    tile_size: int
    mpp: float


class Segmenter(Component):
    """A nuclei segmenter: ``segment(tile uint8 [H, W, 3], ref) -> (instances [H, W], types [H, W] or None)``.

    ``instances`` labels each nucleus with a positive integer (0 = no nucleus; at most 65535 per tile, the
    cache stores uint16); ``types`` gives a class per pixel where the segmenter knows cell types (HoVer-Net,
    the synthetic ``oracle``), else ``None``. ``setup()`` runs once per worker process before the first tile
    (load weights there). ``version`` is part of the segmentation cache key together with the options: bump it
    when the output of the same options changes. ``own_process``: run in a fresh worker process, never in the
    one that imported torch (TensorFlow next to torch's triton can crash). ``input_mpp``: µm/px the segmenter
    was made for (informational; segmenters rescale themselves with their own options).
    """

    kind = "segmenter"
    version: ClassVar[str] = "1"
    own_process: ClassVar[bool] = False

    def setup(self) -> None:
        return None

    def segment(self, tile: "np.ndarray", ref: TileRef | None = None) -> tuple["np.ndarray", "np.ndarray | None"]:
        raise NotImplementedError

    def identity(self) -> str:
        """Name, version and every option: what the segmentation cache is keyed by (besides the tiles)."""
        import hashlib
        import json

        opts = json.dumps(self.options.model_dump(mode="json"), sort_keys=True)
        return f"{self.name}-v{self.version}-{hashlib.sha256(opts.encode()).hexdigest()[:10]}"


class TextEncoder(Component):
    """A text encoder: ``encode(list[str]) -> float [N, dim]`` with unit-norm rows (a torch tensor on the CPU).

    ``dim`` is the output width; ``identity()`` a string naming the model and its weights (text banks are
    cached per (descriptions, identity)); ``shares_image_space`` is True when the encoder's space is the one an
    image tower of the same model embeds into (CLIP-style), so that text-initialised heads mean something
    without an adapter; ``max_tokens`` is the longest input (in the encoder's own tokens) or ``None``, and
    ``count_tokens(text)`` counts them. Models are loaded lazily on the first ``encode``.
    """

    kind = "text_encoder"
    shares_image_space: ClassVar[bool] = False

    @property
    def dim(self) -> int:
        raise NotImplementedError

    @property
    def max_tokens(self) -> int | None:
        return None

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def identity(self) -> str:
        import hashlib
        import json

        opts = json.dumps(self.options.model_dump(mode="json"), sort_keys=True)
        return f"{self.name}-{hashlib.sha256(opts.encode()).hexdigest()[:10]}"

    def encode(self, texts: list[str]) -> "torch.Tensor":
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ protocols


class Protocol(Component):
    """A named evaluation protocol: how a task's slides are turned into metrics over fixed folds.

    ``inputs`` says what it needs: ``{"features"}`` (cached per-slide features; the default ``frozen-mil``)
    or ``{"tiles", "encoder"}`` (the slides' tiles plus the encoder, for protocols that train or re-extract
    the encoder inside each fold). ``evaluate(inputs)`` receives a
    :class:`histobench.evaluate.protocols.ProtocolInputs` and returns an
    :class:`histobench.evaluate.protocol.EvalResult`; the splits (made before pretraining) and the
    evaluation policy are the core's, so a protocol never draws its own folds or computes its own metrics.
    Its ``Options`` are set with ``-o eval.NAME=VALUE`` next to the shared evaluation policy's fields.
    """

    kind = "protocol"
    inputs: ClassVar[frozenset[str]] = frozenset({"features"})
    #: False for a protocol that never trains the run's aggregator (e.g. kNN voting): the run record and the
    #: leaderboard then show no aggregator for its rows.
    uses_aggregator: ClassVar[bool] = True

    def evaluate(self, inputs: Any) -> Any:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------- analyses


class Analysis(Component):
    """An analysis of trained encoders on a fixed held-out tile set (``histobench analyze NAME``).

    ``run(inputs)`` receives a :class:`histobench.analyze.AnalysisInputs` (the encoders, each with a label and
    where it came from, the fixed tile set, an output folder) and returns an
    :class:`histobench.analyze.AnalysisResult`: flat metrics, a JSON-able report, and the files it wrote
    (plots, CSVs). ``min_encoders``/``max_encoders`` bound how many encoders it compares. The core logs the
    result as an MLflow run linked to the runs it analysed.
    """

    kind = "analysis"
    min_encoders: ClassVar[int] = 1
    max_encoders: ClassVar[int | None] = None

    def run(self, inputs: Any) -> Any:
        raise NotImplementedError


BASES: dict[str, type[Component]] = {
    "encoder": Encoder,
    "pretext": Pretext,
    "aggregator": Aggregator,
    "task": Task,
    "segmenter": Segmenter,
    "text_encoder": TextEncoder,
    "protocol": Protocol,
    "analysis": Analysis,
}
HOOKS: dict[str, str] = {
    "encoder": "register_encoders",
    "pretext": "register_pretexts",
    "aggregator": "register_aggregators",
    "task": "register_tasks",
    "segmenter": "register_segmenters",
    "text_encoder": "register_text_encoders",
    "protocol": "register_protocols",
    "analysis": "register_analyses",
}
