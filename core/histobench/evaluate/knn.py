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

import warnings
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
        from histobench.evaluate.folds import describe_small_fold, fold_class_counts
        from histobench.evaluate.protocol import EvalResult, _fold_metrics, _label_index, _summarise

        task, o, opts, splits = inputs.task, self.options, inputs.eval, inputs.splits
        if task.task_kind == "survival":
            raise HistobenchError(f"protocol {self.name!r} votes class probabilities; task {task.name!r} is survival "
                                  f"(use --protocol frozen-mil)")
        if inputs.features is None:
            raise HistobenchError(f"protocol {self.name!r} needs the cached tile features")
        classes = [str(c) for c in task.classes]
        names = list(task.metrics) or None
        from histobench.evaluate.metrics import DEFAULT_METRICS

        names = names or list(DEFAULT_METRICS[task.task_kind])

        # ---------------------------------------------------------------- usable slides (as frozen-mil counts them)
        man = inputs.manifest
        m = man.assign(slide_id=man["slide_id"].astype(str), case_id=man["case_id"].astype(str)).drop_duplicates("slide_id")
        m = m.assign(y=_label_index(m, classes).values)
        skipped = {"unlabeled": int((m["y"] < 0).sum()), "missing_features": 0, "empty": 0, "not_in_splits": 0}
        m = m[m["y"] >= 0]
        test_side = splits.table[splits.table["split"] == "test"]
        in_splits = (m["slide_id"].isin(test_side["slide_id"]) if splits.slide_level
                     else m["case_id"].isin(test_side["case_id"]))
        skipped["not_in_splits"] = int((~in_splits).sum())
        m = m[in_splits]
        bags: dict[str, np.ndarray] = {}
        for sid in m["slide_id"]:
            if sid not in inputs.features:
                skipped["missing_features"] += 1
                continue
            arr = np.asarray(inputs.features[sid], dtype=np.float32)
            if arr.ndim != 2 or len(arr) == 0:
                skipped["empty"] += 1
                continue
            bags[sid] = arr
        m = m[m["slide_id"].isin(bags)].reset_index(drop=True)
        if m.empty:
            raise HistobenchError("no slide has both a label and features")
        if len({a.shape[1] for a in bags.values()}) != 1:
            raise HistobenchError(f"feature widths differ between slides: {sorted({a.shape[1] for a in bags.values()})}")
        small = ""
        problem = describe_small_fold(fold_class_counts(splits, m, task.task_kind, classes), opts.min_test_per_class,
                                      task.task_kind)
        if problem:
            small = f"split {splits.name!r} ({m['case_id'].nunique()} patients with features): {problem}"
            if opts.small_folds == "refuse":
                raise HistobenchError(f"{small}; refusing (eval.small_folds=refuse): use fewer folds (-o task.folds=K)")
            warnings.warn(f"{small}; per-fold values are coarse", stacklevel=2)
        leaks = splits.audit(man)
        label_of = dict(zip(m["slide_id"], m["y"]))
        case_of = dict(zip(m["slide_id"], m["case_id"]))

        def side(k: int, sides: tuple[str, ...]) -> list[str]:
            if splits.slide_level:
                ids = {s for sd in sides for s in splits.slides(k, sd) or []}
                return [s for s in m["slide_id"] if s in ids]
            cases = {c for sd in sides for c in splits.cases(k, sd)}
            return [s for s, c in zip(m["slide_id"], m["case_id"]) if c in cases]

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
        per_fold, index, frames = [], [], []
        folds = sorted(int(f) for f in splits.table["fold"].unique())
        for done, k in enumerate(folds, start=1):
            train = side(k, ("train", "val") if o.use_val else ("train",))
            test = side(k, ("test",))
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
            fold_metrics = _fold_metrics(frame, task.task_kind, names, classes)
            patient_label = {case_of[s]: label_of[s] for s in slide_sum}
            pat_p = np.stack([v / v.sum() for v in patient_sum.values()])
            levels = {
                "patch": _accuracy_pair(np.array([label_of[s] for s in test_owner]), probs),
                "slide": _accuracy_pair(frame["label"].to_numpy(), slide_p),
                "patient": _accuracy_pair(np.array([patient_label[c] for c in patient_sum]), pat_p),
            }
            for lvl, (acc, mca) in levels.items():
                fold_metrics[f"{lvl}_accuracy"], fold_metrics[f"{lvl}_mca"] = acc, mca
            per_fold.append(fold_metrics)
            index.append((k, 0))
            frames.append(frame)
            if inputs.progress is not None:
                inputs.progress(f"fold {k}", done, len(folds))

        predictions = pd.concat(frames, ignore_index=True)
        task_only = [{n: f[n] for n in names} for f in per_fold]
        summary = _summarise(task_only, index, predictions, task.task_kind, classes, opts)
        for name in LEVEL_METRICS:
            entry = stats.fold_estimate([f[name] for f in per_fold], name)
            entry["mean"], entry["sd"] = entry["fold_mean"], entry["fold_sd"]
            summary[name] = entry
        return EvalResult(task_kind=task.task_kind, classes=classes, per_fold=per_fold, summary=summary,
                          predictions=predictions, n_skipped=int(sum(skipped.values())), split_hash=splits.hash,
                          split_name=splits.name, skipped=skipped,
                          n_leaks=int(leaks["case_id"].nunique()) if len(leaks) else 0, per_fold_index=index,
                          small_folds=small)
