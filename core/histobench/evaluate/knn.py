"""``knn-hierarchical``: weighted kNN on frozen tile features, voted up from tiles to slides to patients.

The evaluation of HiDisc (Jiang et al., "Hierarchical discriminative learning improves visual representations
of biomedical microscopy", CVPR 2023, arXiv:2303.01605) that HLSS keeps (Watawana et al., MICCAI 2024,
arXiv:2403.14616; spec ``/work/shared/methods/hlss.md`` §4). Any method's features can be evaluated with it.

Per fold of the core's splits:

* the feature bank is every tile of the fold's train and val slides, L2-normalised, each labelled with its
  slide's class (``bank_tiles_per_slide`` caps it with a seeded draw);
* every test tile (L2-normalised) takes the ``k`` (200) most cosine-similar bank tiles, weights them by
  ``exp(sim / tau)`` (tau 0.07) and sums the weights per class; the scores are L1-normalised, then passed
  through a softmax (as the released code does), giving the tile's probability vector;
* a slide's probabilities are the sum of its tiles' vectors, L1-normalised; a patient's are the sum over its
  slides of those tile sums (the sum of all its tiles' vectors), L1-normalised; each level predicts the argmax.

Metrics. The task's own metrics (AUC, balanced accuracy, F1, or kappa for grading) are the core's, computed
from the slide-level probabilities exactly as for ``frozen-mil`` (both estimators with their CIs, the
predictions table, the plots). Next to them, every fold reports ``patch_accuracy``, ``patch_mca``,
``slide_accuracy``, ``slide_mca``, ``patient_accuracy`` and ``patient_mca`` (accuracy and mean class accuracy,
i.e. macro recall, at each level). These are part of the per-fold metrics (logged on each fold's nested run)
and of the summary with the ``fold`` estimator only (mean ± sd and t-interval over folds; no pooled value).
Classification tasks only. The similarity is computed in chunks of ``chunk`` test tiles, so a large bank
fits in memory on a CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from histobench.components import Protocol, StrictOptions
from histobench.errors import HistobenchError

if TYPE_CHECKING:  # pragma: no cover
    import torch

LEVELS = ("patch", "slide", "patient")
LEVEL_METRICS = tuple(f"{lvl}_{m}" for lvl in LEVELS for m in ("accuracy", "mca"))


def knn_probabilities(bank: "torch.Tensor", bank_labels: "torch.Tensor", queries: "torch.Tensor", n_classes: int,
                      k: int = 200, tau: float = 0.07, chunk: int = 4096) -> "torch.Tensor":
    """Tile probabilities ``[N, C]`` of ``queries`` ``[N, D]`` against ``bank`` ``[M, D]`` (both unit rows).

    The ``min(k, M)`` nearest bank rows by cosine similarity vote for their class with weight
    ``exp(sim / tau)``; the per-class scores are L1-normalised and then softmaxed. Queries are processed
    ``chunk`` rows at a time (the ``[chunk, M]`` similarity block is the largest array).
    """
    import torch

    bank = bank.float()
    labels = bank_labels.long()
    k = min(int(k), bank.shape[0])
    out = []
    for start in range(0, queries.shape[0], max(int(chunk), 1)):
        q = queries[start:start + chunk].float()
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weight = torch.exp(sim.double() / tau)
        scores = torch.zeros(q.shape[0], n_classes, dtype=torch.float64).scatter_add_(1, labels[idx], weight)
        scores = scores / scores.sum(dim=1, keepdim=True)
        out.append(torch.softmax(scores, dim=1))
    return torch.cat(out) if out else torch.zeros(0, n_classes, dtype=torch.float64)


def _normalise(x: np.ndarray) -> "torch.Tensor":
    import torch

    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    return torch.nn.functional.normalize(t, dim=1)


def _accuracy_pair(y: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    from histobench.evaluate.metrics import balanced_accuracy

    pred = probs.argmax(axis=1)
    return float((pred == y).mean()) if len(y) else float("nan"), balanced_accuracy(y, pred)


def vote_levels(tile_probs: np.ndarray, tile_slide: np.ndarray, slide_case: dict[str, str]) -> tuple[dict, dict]:
    """Sum tile probability vectors per slide and per patient; returns ``(slide -> sum, patient -> sum)``
    (unnormalised: a patient's sum is the sum of its slides' sums, i.e. of all its tiles)."""
    slides: dict[str, np.ndarray] = {}
    for sid in dict.fromkeys(tile_slide):
        slides[sid] = tile_probs[tile_slide == sid].sum(axis=0)
    patients: dict[str, np.ndarray] = {}
    for sid, v in slides.items():
        c = slide_case[sid]
        patients[c] = patients[c] + v if c in patients else v.copy()
    return slides, patients


class KNNHierarchical(Protocol):
    """Weighted kNN (k 200, τ 0.07) on frozen tile features, voted tile → slide → patient (HiDisc / HLSS)."""

    name = "knn-hierarchical"
    inputs = frozenset({"features"})
    uses_aggregator = False  # the neighbours vote; no aggregator is trained

    class Options(StrictOptions):
        k: int = Field(200, ge=1, description="Neighbours per test tile (HiDisc/HLSS: 200).")
        tau: float = Field(0.07, gt=0, description="Temperature of the neighbour weights exp(sim / tau) (0.07).")
        chunk: int = Field(4096, ge=1, description="Test tiles per similarity block (memory bound: chunk x bank).")
        bank_tiles_per_slide: int = Field(0, ge=0, description="Cap on bank tiles per training slide, seeded draw (0: all).")
        test_tiles_per_slide: int = Field(0, ge=0, description="Cap on voting tiles per test slide, seeded draw (0: all).")
        use_val: bool = Field(True, description="Put the val patients' tiles in the bank next to the train patients'.")

    def evaluate(self, inputs):
        import pandas as pd
        import torch

        from histobench.evaluate import stats
        from histobench.evaluate.protocol import build_result, check_splits, fold_slides, labelled_slides, metric_names

        task, o, opts, splits = inputs.task, self.options, inputs.eval, inputs.splits
        if task.task_kind == "survival":
            raise HistobenchError(f"protocol {self.name!r} votes class probabilities; task {task.name!r} is survival "
                                  f"(use --protocol frozen-mil)")
        if inputs.features is None:
            raise HistobenchError(f"protocol {self.name!r} needs the cached tile features")
        classes = [str(c) for c in task.classes]
        names = metric_names(task.task_kind, list(task.metrics) or None)
        usable = labelled_slides(task.task_kind, classes, inputs.manifest, inputs.features, splits)
        m, bags = usable.frame, usable.bags
        small, leaks = check_splits(splits, m, inputs.manifest, task.task_kind, classes, opts)
        label_of = dict(zip(m["slide_id"], m["y"]))
        case_of = dict(zip(m["slide_id"], m["case_id"]))

        def stack(slide_ids: list[str], cap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
            rng = np.random.default_rng(seed)
            feats, owner = [], []
            for sid in slide_ids:
                a = bags[sid]
                if cap and len(a) > cap:
                    a = a[np.sort(rng.choice(len(a), cap, replace=False))]
                feats.append(a)
                owner += [sid] * len(a)
            return np.concatenate(feats), np.array(owner, dtype=object)

        # ---------------------------------------------------------------- folds
        levels_per_fold, index, frames = [], [], []
        folds = sorted(int(f) for f in splits.table["fold"].unique())
        for done, k in enumerate(folds, start=1):
            train = list(fold_slides(m, splits, k, ("train", "val") if o.use_val else ("train",))["slide_id"])
            test = list(fold_slides(m, splits, k, ("test",))["slide_id"])
            if not train or not test:
                raise HistobenchError(f"fold {k} has no {'training' if not train else 'test'} slides with features")
            bank_x, bank_owner = stack(train, o.bank_tiles_per_slide, opts.seed + k)
            test_x, test_owner = stack(test, o.test_tiles_per_slide, opts.seed + 1000 + k)
            bank_y = torch.as_tensor(np.array([label_of[s] for s in bank_owner], dtype=np.int64))
            probs = knn_probabilities(_normalise(bank_x), bank_y, _normalise(test_x), len(classes), o.k, o.tau,
                                      o.chunk).numpy()
            slide_sum, patient_sum = vote_levels(probs, test_owner, case_of)
            slide_p = np.stack([v / v.sum() for v in slide_sum.values()])
            frame = pd.DataFrame({"slide_id": list(slide_sum), "case_id": [case_of[s] for s in slide_sum],
                                  "fold": k, "seed": 0, "label": [label_of[s] for s in slide_sum]})
            for c, cls in enumerate(classes):
                frame[f"prob_{cls}"] = slide_p[:, c]
            patient_label = {case_of[s]: label_of[s] for s in slide_sum}
            pat_p = np.stack([v / v.sum() for v in patient_sum.values()])
            pairs = {
                "patch": _accuracy_pair(np.array([label_of[s] for s in test_owner]), probs),
                "slide": _accuracy_pair(frame["label"].to_numpy(), slide_p),
                "patient": _accuracy_pair(np.array([patient_label[c] for c in patient_sum]), pat_p),
            }
            levels_per_fold.append({f"{lvl}_{key}": v for lvl, (acc, mca) in pairs.items()
                                    for key, v in (("accuracy", acc), ("mca", mca))})
            index.append((k, 0))
            frames.append(frame)
            if inputs.progress is not None:
                inputs.progress(f"fold {k}", done, len(folds))

        # the task's metrics from the slide probabilities, by the core; the level metrics beside them (fold estimator)
        result = build_result(task_kind=task.task_kind, classes=classes, names=names, frames=frames, index=index,
                              opts=opts, splits=splits, skipped=usable.skipped, leaks=leaks, small=small)
        for fold_metrics, extra in zip(result.per_fold, levels_per_fold):
            fold_metrics.update(extra)
        for name in LEVEL_METRICS:
            entry = stats.fold_estimate([f[name] for f in levels_per_fold], name)
            entry["mean"], entry["sd"] = entry["fold_mean"], entry["fold_sd"]
            result.summary[name] = entry
        return result
