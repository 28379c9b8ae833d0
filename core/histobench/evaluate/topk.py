"""``topk-finetune``: the encoder fine-tuned end to end on each slide's top-k tiles, inside every fold.

HistoTransfer (Sharma, Ehsan, Syed and Brown, "HistoTransfer: Understanding Transfer Learning for
Histopathology", IEEE BHI 2021, arXiv:2106.07068) fine-tunes a patch encoder cheaply: a MIL head trained on
frozen features ranks each slide's tiles by attention, and the encoder plus the head are then trained on the
``k`` highest-ranked tiles of every slide with slide labels. Per fold of the core's splits:

1. **Stage 1.** The task's aggregator on the frozen features of the fold's *train* patients, trained by
   :func:`histobench.evaluate.train.fit_aggregator` under the shared policy (``stage1_epochs`` overrides its
   epochs), seed ``eval.seed + 1000 * s + k`` as in ``frozen-mil``.
2. **Selection, once.** The ``min(k, n_i)`` tiles with the largest stage-1 attention of every train and
   val slide (ties: the lower tile index first). Never refreshed, never on the test side.
3. **Stage 2.** A deep copy of the encoder (its parameters with ``requires_grad``; BatchNorm layers kept in
   eval mode, so their running statistics stay those of the pretrained network while their affine weights
   train) and of the stage-1 head, trained end to end on the selected tiles with the slides' labels: Adam at
   ``finetune_lr``, ``finetune_batch_size`` slides per step (the paper: one), cross-entropy with the shared
   policy's class weighting, no augmentation, no schedule. After each epoch the val slides' top-k bags are
   scored; the kept epoch is the best by ``select_by`` (the paper: val accuracy, ties going to the later
   epoch); val loss and AUC are logged too.
4. **Test.** Every tile of the fold's test slides is re-extracted with the fine-tuned encoder
   (``ProtocolInputs.extract``, cached by weights hash) and the fine-tuned head scores the whole bag.

Validation patients are the splits' ``val`` side; where it is empty (the core's own folds have none), a
stratified, seeded ``val_fraction`` of each class's training patients (at least one when the class has two)
is held out, so the test side is exactly ``frozen-mil``'s. A val side with one class is a one-line error.
The predictions are one row per test slide (pitfall 8 of the method spec: no tile-weighted AUC) and go
through :func:`histobench.evaluate.protocol.build_result`, so metrics and CIs are the core's. The stage-1
head's test metrics are logged beside them (``topk/stage1_<metric>``) and the leak audit (no test slide
selected, trained on or used for model selection) under ``topk/leak_audit/*``. Fine-tuned weights go to
``ProtocolInputs.artifacts/fold<k>/``. Classification tasks only.
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Protocol as TypingProtocol, Sequence

import numpy as np
from pydantic import Field

from histobench.components import Protocol, StrictOptions
from histobench.errors import HistobenchError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch
    from torch import nn

    from histobench.components import InputTransform
    from histobench.evaluate.options import EvalOptions
    from histobench.evaluate.protocols import ProtocolInputs

SELECT_BY = ("val_accuracy", "val_loss", "val_auc", "last")


# ------------------------------------------------------------------------------------------ selection


def select_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``min(k, n)`` largest ``scores``, largest first; equal scores: the lower index first."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    order = np.lexsort((np.arange(len(s)), -s))
    return order[: min(k, len(s))].astype(np.int64)


def tile_scores(head: "nn.Module", bags: Sequence[np.ndarray], aggregator: str = "aggregator") -> list[np.ndarray]:
    """Stage-1 attention of every tile of each bag (``predict``: eval mode, all tiles). An aggregator without
    attention, or with uniform attention on every bag (``mean-linear``), is a one-line error."""
    from histobench.evaluate.train import predict

    _, attention = predict(head, bags)
    missing = any(a is None for a in attention)
    if missing or all(float(np.ptp(a)) <= 1e-12 for a in attention if len(a) > 1):
        what = "no tile attention" if missing else "only uniform tile attention"
        raise HistobenchError(f"aggregator {aggregator!r} gives {what}; topk-finetune ranks tiles by stage-1 "
                              f"attention: use an attention aggregator (e.g. --aggregator abmil)")
    return attention  # type: ignore[return-value]


def select_bags(head: "nn.Module", bags: Mapping[str, np.ndarray], slide_ids: Sequence[str], k: int,
                aggregator: str = "aggregator") -> dict[str, np.ndarray]:
    """``slide_id -> top-k tile indices`` by stage-1 attention, for ``slide_ids`` (train and val slides only)."""
    ids = list(slide_ids)
    scores = tile_scores(head, [bags[s] for s in ids], aggregator)
    return {s: select_topk(a, k) for s, a in zip(ids, scores)}


# ------------------------------------------------------------------------------------------ tile sources


class TileSource(TypingProtocol):
    """Where stage 2 reads pixels: ``load({slide_id: tile indices}) -> {slide_id: uint8 [n, 3, S, S]}``."""

    def load(self, selection: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class ArrayTiles:
    """Tiles held in memory (``slide_id -> uint8 [N, 3, S, S]``); ``loaded`` records every request."""

    tiles: Mapping[str, np.ndarray]
    loaded: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)

    def load(self, selection: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for sid, idx in selection.items():
            self.loaded.append((sid, tuple(int(i) for i in idx)))
            out[sid] = np.asarray(self.tiles[sid])[np.asarray(idx, dtype=np.int64)]
        return out


@dataclass
class SlideFileTiles:
    """Tiles read from the slide files: only the selected ones, decoded once per fold into a uint8 cache.

    ``slides`` are the run's :class:`~histobench.pretrain.data.SlideTiles`, in the order of the features
    (capped as extraction capped them). The cache is a memory-mapped ``.npy`` under ``folder`` (a temporary
    folder per fold, removed with it).
    """

    slides: Mapping[str, Any]  # slide_id -> SlideTiles
    folder: Path
    reporter: Any = None
    loaded: int = 0

    def load(self, selection: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from histobench.pretrain.data import SlideTileDataset, cache_uint8

        subsets, order = [], []
        for sid, idx in selection.items():
            s = self.slides[sid]
            keep = np.asarray(idx, dtype=np.int64)
            t = s.tiles
            subsets.append(replace(s, tiles=replace(t, coords=t.coords[keep], tissue_fraction=t.tissue_fraction[keep])))
            order.append((sid, len(keep)))
        data = cache_uint8(SlideTileDataset(subsets, decode="jpeg"), Path(self.folder) / "topk-tiles.npy", self.reporter)
        out, pos = {}, 0
        for sid, n in order:
            out[sid] = data.array[pos:pos + n]
            pos += n
        self.loaded += pos
        return out


# ------------------------------------------------------------------------------------------ stage 2


def set_batchnorm_eval(module: "nn.Module") -> int:
    """Put every BatchNorm layer of ``module`` in eval mode (running statistics frozen); returns how many."""
    from torch import nn

    n = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            n += 1
    return n


def bag_logits(encoder: "nn.Module", head: "nn.Module", tiles: Sequence["torch.Tensor"], transform: "InputTransform",
               device: "torch.device") -> "torch.Tensor":
    """Slide logits ``[B, K]`` of bags of uint8 tiles ``[n_i, 3, S, S]``: encode every tile (one forward for the
    batch), pad the bags and pool them with the head, as stage 1 pools cached features."""
    import torch

    from histobench.evaluate.train import pad_bags
    from histobench.features.extract import prepare_pixels

    x = torch.cat([t for t in tiles]).to(device, non_blocking=True)
    feats = encoder(prepare_pixels(x, transform))
    bags = list(torch.split(feats, [len(t) for t in tiles]))
    xb, mask = pad_bags(bags)
    out, _ = head(xb, mask)
    return out


def finetune_step(encoder: "nn.Module", head: "nn.Module", optimizer: "torch.optim.Optimizer",
                  tiles: Sequence["torch.Tensor"], target: "torch.Tensor", loss_fn: Callable, transform: "InputTransform",
                  device: "torch.device") -> float:
    """One stage-2 optimizer step on a batch of top-k bags; returns the loss."""
    out = bag_logits(encoder, head, tiles, transform, device)
    loss = loss_fn(out, target.to(device))
    if not bool(loss.isfinite()):
        raise FloatingPointError("non-finite top-k fine-tuning loss")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def train_mode(encoder: "nn.Module", head: "nn.Module", bn_eval: bool) -> None:
    """Encoder and head in training mode, BatchNorm layers back in eval mode when ``bn_eval``."""
    encoder.train()
    head.train()
    if bn_eval:
        set_batchnorm_eval(encoder)


@dataclass
class FinetuneResult:
    encoder: Any
    head: Any
    history: list[dict[str, float]]
    """Per epoch: ``epoch, train_loss, val_loss, val_accuracy, val_auc``."""
    best_epoch: int
    """The kept epoch (1-based)."""


def finetune(encoder: "nn.Module", head: "nn.Module", train_tiles: Sequence[np.ndarray], train_y: np.ndarray,
             val_tiles: Sequence[np.ndarray], val_y: np.ndarray, *, n_classes: int, transform: "InputTransform",
             options: "TopKFinetune.Options", class_weighting: str = "balanced", seed: int = 0, device: str | None = None,
             reporter: Any = None) -> FinetuneResult:
    """Stage 2 on copies of ``encoder`` and ``head`` (the originals are untouched); returns the kept epoch's.

    ``train_tiles``/``val_tiles`` are the slides' top-k bags (uint8 ``[n_i, 3, S, S]``). Batches, shuffling
    and dropout come from ``seed``; the global torch RNG is left as it was.
    """
    import torch

    from histobench.device import resolve_device
    from histobench.evaluate.metrics import METRICS
    from histobench.evaluate.train import _cross_entropy, class_weights
    from histobench.reporting import Reporter

    if len(train_tiles) == 0 or len(val_tiles) == 0:
        raise HistobenchError("top-k fine-tuning needs training and validation slides")
    o = options
    dev = resolve_device(device)
    reporter = reporter or Reporter()
    enc = copy.deepcopy(encoder).to(dev)
    hd = copy.deepcopy(head).to(dev)
    params = [p for p in enc.parameters() if p.requires_grad] + [p for p in hd.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=o.finetune_lr)
    weight = torch.from_numpy(class_weights(np.asarray(train_y), n_classes, class_weighting)).to(dev)
    loss_fn = _cross_entropy(weight)
    # bags stay where the source put them (a memory-mapped cache for slides); a batch is copied in when used
    train_t, val_t = list(train_tiles), list(val_tiles)
    y_train = torch.as_tensor(np.array(train_y), dtype=torch.long)
    y_val = np.array(val_y, dtype=np.int64)
    rng = np.random.default_rng(seed)
    bs = o.finetune_batch_size
    steps = math.ceil(len(train_t) / bs)
    history: list[dict[str, float]] = []
    best: tuple[int, float, dict, dict] | None = None
    fork = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(seed)
        with reporter.stage("top-k fine-tuning", total=o.finetune_epochs * steps, unit="steps") as st:
            for epoch in range(1, o.finetune_epochs + 1):
                train_mode(enc, hd, o.bn_eval)
                order = rng.permutation(len(train_t))
                total = 0.0
                for b in range(steps):
                    idx = order[b * bs:(b + 1) * bs]
                    total += finetune_step(enc, hd, optimizer, _tensors(train_t, idx), y_train[idx], loss_fn,
                                           transform, dev) * len(idx)
                    st.advance()
                logits = score_bags(enc, hd, val_t, transform, dev, batch=bs)
                probs = torch.softmax(logits.double(), dim=1).numpy()
                val_loss = float(torch.nn.functional.cross_entropy(logits.float(), torch.from_numpy(y_val),
                                                                   weight=weight.cpu()))
                row = {"epoch": epoch, "train_loss": total / len(train_t), "val_loss": val_loss,
                       "val_accuracy": float((probs.argmax(axis=1) == y_val).mean()),
                       "val_auc": float(METRICS["macro_auc"](y_val, probs))}
                history.append(row)
                if best is None or _better(row, best[1], o.select_by):
                    key = -row["val_loss"] if o.select_by == "val_loss" else row.get(o.select_by, 0.0)
                    best = (epoch, key, _cpu_state(enc), _cpu_state(hd))
    assert best is not None
    enc.load_state_dict(best[2])
    hd.load_state_dict(best[3])
    enc.eval()
    hd.eval()
    return FinetuneResult(enc, hd, history, best[0])


def _better(row: dict[str, float], best_key: float, select_by: str) -> bool:
    """Whether this epoch replaces the kept one: ties go to the later epoch (the paper's ``>=``)."""
    if select_by == "last":
        return True
    key = -row["val_loss"] if select_by == "val_loss" else row[select_by]
    if not math.isfinite(key):
        return False
    return not math.isfinite(best_key) or key >= best_key


def _tensors(bags: Sequence[np.ndarray], idx) -> list["torch.Tensor"]:
    """Writable CPU tensors of the chosen bags (copies: a memory-mapped cache is read-only)."""
    import torch

    return [torch.from_numpy(np.array(bags[int(i)])) for i in idx]


def _cpu_state(module: "nn.Module") -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def score_bags(encoder: "nn.Module", head: "nn.Module", bags: Sequence[np.ndarray], transform: "InputTransform",
               device: "torch.device", batch: int = 1) -> "torch.Tensor":
    """Slide logits (CPU, float) of uint8 top-k bags in eval mode, without gradients; modes restored after."""
    import torch

    modes = [(m, m.training) for m in (*encoder.modules(), *head.modules())]
    encoder.eval()
    head.eval()
    try:
        with torch.inference_mode():
            outs = [bag_logits(encoder, head, _tensors(bags, range(i, min(i + batch, len(bags)))), transform,
                               device).float().cpu() for i in range(0, len(bags), batch)]
    finally:
        for m, was in modes:
            m.training = was
    return torch.cat(outs)


# ------------------------------------------------------------------------------------------ the protocol


def validation_cases(train_cases: Sequence[str], labels: Mapping[str, int], fraction: float, seed: int) -> set[str]:
    """A stratified, seeded share of the training patients held out for model selection: per class
    ``round(fraction * n)`` patients, at least one where the class has two or more."""
    rng = np.random.default_rng(seed)
    out: set[str] = set()
    for y in sorted({labels[c] for c in train_cases}):
        members = np.array(sorted(c for c in train_cases if labels[c] == y))
        take = max(1, int(round(fraction * len(members)))) if len(members) >= 2 else 0
        out.update(members[rng.permutation(len(members))[:take]].tolist())
    return out


def _patient_labels(frame: "pd.DataFrame") -> dict[str, int]:
    return frame.groupby("case_id")["y"].agg(lambda v: int(v.mode().iloc[0])).to_dict()


class TopKFinetune(Protocol):
    """HistoTransfer's top-k fine-tuning (Sharma et al., BHI 2021): stage-1 attention picks each slide's k
    tiles, the encoder and head are fine-tuned on them, test slides are re-extracted with the tuned encoder."""

    name = "topk-finetune"
    inputs = frozenset({"features", "tiles", "encoder"})
    presets = {"demo": {"top_k": 8, "finetune_epochs": 3, "finetune_lr": 1e-4, "finetune_batch_size": 4}}

    class Options(StrictOptions):
        top_k: int = Field(64, ge=1, description="Tiles per slide for stage 2 (bags with fewer are used whole).")
        finetune_epochs: int = Field(20, ge=1, description="Stage-2 epochs over the training slides' top-k bags.")
        finetune_lr: float = Field(1e-5, gt=0, description="Stage-2 Adam learning rate (no schedule, no weight decay).")
        finetune_batch_size: int = Field(1, ge=1, description="Slides per stage-2 optimizer step (the paper: 1).")
        select_by: Literal["val_accuracy", "val_loss", "val_auc", "last"] = Field(
            "val_accuracy", description="Stage-2 epoch kept: best val accuracy (ties: later epoch), loss, AUC, or the last.")
        bn_eval: bool = Field(True, description="BatchNorm layers in eval mode during stage 2 (running stats frozen).")
        stage1_epochs: int | None = Field(None, ge=1, description="Stage-1 head epochs (default: the shared eval.epochs).")
        val_fraction: float = Field(
            0.2, gt=0, lt=1, description="Share of each class's training patients held out for model selection when "
                                         "the splits have no val side.")
        save_weights: bool = Field(True, description="Write each fold's fine-tuned encoder and head as run artifacts.")

    def evaluate(self, inputs: "ProtocolInputs"):
        if inputs.task.task_kind == "survival":
            raise HistobenchError(f"protocol {self.name!r} evaluates classification tasks (subtyping, grading); "
                                  f"task {inputs.task.name!r} is survival: use --protocol frozen-mil")
        if inputs.features is None or inputs.slides is None or inputs.encoder is None or inputs.extract is None:
            raise HistobenchError(f"protocol {self.name!r} needs features, tiles and the encoder (histobench run)")
        slides = _aligned_slides(inputs)
        base = Path(inputs.artifacts).parent if inputs.artifacts is not None else None
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)

        def source(fold_dir: Path) -> TileSource:
            return SlideFileTiles(slides, fold_dir, inputs.reporter)

        def extract(module, slide_ids: list[str], tag: str) -> Mapping[str, np.ndarray]:
            return inputs.extract(module, [slides[s] for s in slide_ids], tag)

        return evaluate_topk(inputs, self.options, source, extract, inputs.encoder_component.transform(),
                             tmp_root=base)


def _aligned_slides(inputs: "ProtocolInputs") -> dict[str, Any]:
    """The run's slides with the tiles extraction encoded (capped as it capped them), checked against the
    features' row counts, so that feature row ``i`` is tile ``i``."""
    from histobench.slides.tiling import select_tiles

    cap = int(getattr(inputs.task.options, "max_tiles_per_slide", 0) or 0)
    out = {}
    for s in inputs.slides:
        s = replace(s, tiles=select_tiles(s.tiles, cap, 0)) if cap else s
        if s.slide_id in inputs.features:
            n = len(inputs.features[s.slide_id])
            if n != len(s.tiles):
                raise HistobenchError(f"slide {s.slide_id}: {n} feature rows but {len(s.tiles)} tiles; extract again")
        out[s.slide_id] = s
    return out


def evaluate_topk(inputs: "ProtocolInputs", options: "TopKFinetune.Options",
                  source: Callable[[Path], TileSource],
                  extract: Callable[[Any, list[str], str], Mapping[str, np.ndarray]],
                  transform: "InputTransform", tmp_root: Path | None = None):
    """The protocol over the folds of ``inputs.splits`` (see the module docstring); returns an ``EvalResult``.

    ``source(folder)`` gives the fold's :class:`TileSource`; ``extract(module, slide_ids, tag)`` encodes every
    tile of the named slides with ``module``. ``inputs.slides`` is not read here.
    """
    import torch

    from histobench.evaluate.protocol import (build_result, check_splits, classification_frame, fold_slides,
                                              labelled_slides, metric_names)
    from histobench.evaluate.train import fit_aggregator, predict

    o = options
    task = inputs.task
    kind = task.task_kind
    classes = [str(c) for c in task.classes]
    names = metric_names(kind, list(task.metrics) or None)
    ev: EvalOptions = inputs.eval
    usable = labelled_slides(kind, classes, inputs.manifest, inputs.features, inputs.splits)
    m, bags = usable.frame, usable.bags
    small, leaks = check_splits(inputs.splits, m, inputs.manifest, kind, classes, ev)
    labels = _patient_labels(m)
    splits = inputs.splits
    reporter = inputs.reporter
    n_out = len(classes)
    stage1_opts = ev.model_copy(update={"epochs": o.stage1_epochs}) if o.stage1_epochs else ev

    frames, frames1, index, attention = [], [], [], {}
    audit = {"test_slides_selected": 0, "test_slides_trained": 0, "test_slides_in_model_selection": 0,
             "test_patients_in_training": 0}
    bags_total = bags_small = 0
    best_epochs: list[int] = []
    kept: list[dict[str, float]] = []
    folds = sorted(int(f) for f in splits.table["fold"].unique())
    for done, k in enumerate(folds, start=1):
        test = fold_slides(m, splits, k, ("test",))
        val = fold_slides(m, splits, k, ("val",))
        train = fold_slides(m, splits, k, ("train",))
        if val.empty:  # the core's folds have no val side: hold out patients of the train side
            held = validation_cases(sorted(set(train["case_id"])), labels, o.val_fraction, ev.seed + k)
            val, train = train[train["case_id"].isin(held)], train[~train["case_id"].isin(held)]
        if train.empty or test.empty:
            raise HistobenchError(f"fold {k} has no {'training' if train.empty else 'test'} slides with features")
        if val["y"].nunique() < 2:
            present = ", ".join(classes[i] for i in sorted(set(val["y"])))
            what = f"holds one class ({present})" if present else \
                "is empty (no class has two training patients to hold one out)"
            raise HistobenchError(f"fold {k}: the validation side {what}; top-k fine-tuning "
                                  f"selects its model on validation accuracy: use fewer folds (-o task.folds=K) "
                                  f"or a larger eval.val_fraction")
        test_ids = set(test["slide_id"])
        for rep in range(ev.seeds):
            seed = ev.seed + 1000 * rep + k
            fold_opts = stage1_opts.model_copy(update={"seed": seed})
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                head = inputs.aggregator.build(usable.in_dim, n_out)
            head = fit_aggregator(head, [bags[s] for s in train["slide_id"]], train["y"].to_numpy(), fold_opts,
                                  n_outputs=n_out)
            out1, _ = predict(head, [bags[s] for s in test["slide_id"]])
            frames1.append(classification_frame(test, out1, classes, k, rep))

            chosen = list(train["slide_id"]) + list(val["slide_id"])
            selection = select_bags(head, bags, chosen, o.top_k, inputs.aggregator.name)
            bags_total += len(selection)
            bags_small += sum(len(bags[s]) < o.top_k for s in selection)
            audit["test_slides_selected"] += len(test_ids & set(selection))
            audit["test_slides_trained"] += len(test_ids & set(train["slide_id"]))
            audit["test_slides_in_model_selection"] += len(test_ids & set(val["slide_id"]))
            audit["test_patients_in_training"] += len(set(test["case_id"]) & set(chosen_cases(m, chosen)))
            if audit["test_slides_selected"] or audit["test_slides_trained"] or audit["test_slides_in_model_selection"]:
                raise HistobenchError(f"leak audit failed in fold {k}: a test slide reached selection or fine-tuning "
                                      f"({audit})")

            with tempfile.TemporaryDirectory(dir=tmp_root, prefix=f"topk-fold{k}-") as tmp:
                tiles = source(Path(tmp)).load(selection)
                tuned = finetune(inputs.encoder, head, [tiles[s] for s in train["slide_id"]], train["y"].to_numpy(),
                                 [tiles[s] for s in val["slide_id"]], val["y"].to_numpy(), n_classes=n_out,
                                 transform=transform, options=o, class_weighting=ev.class_weighting, seed=seed,
                                 device=inputs.device or ev.device, reporter=reporter)
                del tiles
            best_epochs.append(tuned.best_epoch)
            last = tuned.history[tuned.best_epoch - 1]
            kept.append(last)
            reporter.info(f"fold {k}: kept fine-tuning epoch {tuned.best_epoch}/{o.finetune_epochs} "
                          f"(val accuracy {last['val_accuracy']:.3f}, loss {last['val_loss']:.3f}, AUC {last['val_auc']:.3f})")
            feats = extract(tuned.encoder, sorted(test_ids), f"topk-finetune-fold{k}-seed{rep}")
            test_bags = [np.asarray(feats[s], dtype=np.float32) for s in test["slide_id"]]
            out2, att = predict(tuned.head, test_bags)
            frames.append(classification_frame(test, out2, classes, k, rep))
            index.append((k, rep))
            if rep == 0:
                for sid, a in list(zip(test["slide_id"], att))[:2]:
                    if a is not None:
                        attention[sid] = a
            if inputs.artifacts is not None and o.save_weights:
                _save_fold(Path(inputs.artifacts) / f"fold{k}" / (f"seed{rep}" if rep else ""), tuned, selection, o)
        if inputs.progress is not None:
            inputs.progress(f"fold {k}", done, len(folds))

    if bags_small:
        reporter.info(f"top_k={o.top_k}: {bags_small} of {bags_total} selected bags had fewer tiles and were used whole")
    metrics = inputs.metrics
    metrics["topk/bags_smaller_than_k"] = float(bags_small)
    metrics["topk/bags_selected"] = float(bags_total)
    metrics["topk/best_epoch_mean"] = float(np.mean(best_epochs))
    for key in ("val_accuracy", "val_loss", "val_auc"):  # of the kept epochs, mean over folds and seeds
        metrics[f"topk/kept_{key}_mean"] = float(np.nanmean([h[key] for h in kept]))
    for key, value in audit.items():
        metrics[f"topk/leak_audit/{key}"] = float(value)
    metrics["topk/leak_audit/passed"] = 1.0
    stage1 = build_result(task_kind=kind, classes=classes, names=names, frames=frames1, index=index,
                          opts=ev.model_copy(update={"bootstrap": 0}), splits=splits, skipped=usable.skipped,
                          leaks=leaks)
    for name, entry in stage1.summary.items():
        metrics[f"topk/stage1_{name}"] = float(entry["fold_mean"])
    result = build_result(task_kind=kind, classes=classes, names=names, frames=frames, index=index, opts=ev,
                          splits=splits, skipped=usable.skipped, leaks=leaks, attention=attention, small=small)
    result.stage1 = stage1  # type: ignore[attr-defined]  (for callers and tests; not logged as a result)
    return result


def chosen_cases(frame: "pd.DataFrame", slide_ids: Sequence[str]) -> set[str]:
    """The patients of ``slide_ids``."""
    return set(frame.loc[frame["slide_id"].isin(list(slide_ids)), "case_id"])


def _save_fold(folder: Path, tuned: FinetuneResult, selection: Mapping[str, np.ndarray], o) -> None:
    """The fold's fine-tuned encoder and head (state dicts), its selection and its stage-2 history."""
    import json

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(_cpu_state(tuned.encoder), folder / "encoder.pt")
    torch.save(_cpu_state(tuned.head), folder / "aggregator.pt")
    (folder / "finetune.json").write_text(json.dumps({
        "best_epoch": tuned.best_epoch, "history": tuned.history, "options": o.model_dump(),
        "selection": {s: [int(i) for i in idx] for s, idx in selection.items()},
    }, indent=1) + "\n")
