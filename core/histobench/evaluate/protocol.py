"""The slide-level evaluation protocol: per-fold aggregator training on cached features, metrics, CIs.

Slides are the units (each slide is one bag with the manifest's label, or ``time``/``event``); patients
are what the folds group. Each fold trains a freshly built aggregator on the slides of its train and val
patients (the one policy has a fixed epoch budget, so val is not held out for early stopping) and predicts
the slides of its test patients, once per seed (``eval.seeds``).

* subtyping / grading: class-weighted cross-entropy; metrics per fold and on the pooled out-of-fold
  predictions.
* survival: the aggregator is built with ``eval.survival_bins`` outputs and trained with the discrete-time
  NLL (:mod:`histobench.evaluate.survival`); the protocol also fits a ridge Cox PH on mean-pooled features.
  Metrics ``c_index``/``c_index_uno`` (discrete-time model), ``cox_c_index``/``cox_c_index_uno`` and
  ``logrank_p`` (test patients split at the fold's median risk).

Every metric's summary holds two estimators, each with its own 95% CI (:mod:`histobench.evaluate.stats`
names them): ``fold`` (mean ± sd over folds, t-interval over folds) and ``pooled`` (classification: pooled
out-of-fold patients, patient bootstrap) or ``fold_boot`` (survival, whose risks of different folds are not
on one scale: mean over folds, patient bootstrap within folds). Before training, the test folds are checked
for enough patients of every class (:mod:`histobench.evaluate.folds`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from histobench.cohorts.splits import Splits
from histobench.components import Aggregator
from histobench.errors import HistobenchError
from histobench.evaluate import stats
from histobench.evaluate.metrics import DEFAULT_METRICS, METRICS
from histobench.evaluate.options import EvalOptions
from histobench.evaluate.train import fit_aggregator, predict

Progress = Callable[[str, int, int], None]


@dataclass
class EvalResult:
    """What one evaluation of one feature set on one task produced."""

    task_kind: str
    classes: list[str]
    per_fold: list[dict[str, float]]
    """Metrics of each fold's test slides, in fold order."""
    summary: dict[str, dict[str, float]]
    """Per metric, the estimators of :data:`histobench.evaluate.stats.ESTIMATORS`, each next to its own CI:
    ``fold_mean``, ``fold_sd``, ``fold_ci_low``, ``fold_ci_high`` (t-interval over folds), ``n_folds``, and
    ``mean``/``sd`` (the same fold values, for older readers); then for classification ``pooled``,
    ``pooled_ci_low``, ``pooled_ci_high`` (patient bootstrap) and ``n_patients``, for survival ``fold_boot``,
    ``fold_boot_ci_low``, ``fold_boot_ci_high`` (patient bootstrap within folds) and for ``logrank_p``
    ``pooled`` (the pooled test, no CI). Logged to MLflow as ``<metric>_<key>``."""
    predictions: pd.DataFrame
    """One row per test slide and seed repeat: ``slide_id, case_id, fold, seed`` then ``label`` (class index),
    ``prob_<class>``... or, for survival, ``time, event, risk, cox_risk, surv_<k>``..."""
    n_skipped: int
    """Slides left out: labels not in ``classes``, in no test fold, missing features, or empty bags."""
    split_hash: str
    split_name: str = ""
    skipped: dict[str, int] = field(default_factory=dict)
    """``n_skipped`` by reason: ``unlabeled``, ``not_in_splits`` (in no fold's test side), ``missing_features``,
    ``empty``."""
    n_leaks: int = 0
    """Patients on two sides of a fold according to the splits audit (0 for :func:`make_splits`)."""
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    """Tile attention of a few test slides per fold (``slide_id -> [N]``), for heatmaps."""
    per_fold_index: list[tuple[int, int]] = field(default_factory=list)
    """``(fold, seed repeat)`` of each entry of ``per_fold``."""
    small_folds: str = ""
    """The one-line small-fold warning of this evaluation ('' when every test fold was large enough)."""

    @property
    def metrics(self) -> list[str]:
        return list(self.summary)

    def estimator_labels(self, metric: str | None = None) -> dict[str, str]:
        """``estimator key -> "value label; 95% CI: CI label"`` for a metric's summary (default: the first)."""
        entry = self.summary[metric or next(iter(self.summary))]
        n = int(entry.get("n_folds", 0)) or None
        return {k: stats.estimator_label(k, n) + "; 95% CI: " + stats.estimator_label(k, n, ci=True)
                for k in stats.summary_estimators(entry)}


def _label_index(manifest: pd.DataFrame, classes: list[str]) -> pd.Series:
    """The class index of each manifest row (by the label's string form); -1 where it is not a class."""
    if "label" not in manifest.columns:
        raise HistobenchError("the manifest has no 'label' column")
    index = {str(c): i for i, c in enumerate(classes)}
    labels = manifest["label"]
    as_text = labels.map(lambda v: str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
    return as_text.map(index).where(labels.notna(), np.nan).fillna(-1).astype(int)


@dataclass
class LabelledSlides:
    """The slides an evaluation can use: labelled, in some fold's test side, with a non-empty bag."""

    frame: pd.DataFrame
    """One row per usable slide: ``slide_id, case_id, y`` (class index; 0 for survival) and, for survival,
    ``time, event``; in manifest order."""
    bags: dict[str, np.ndarray]
    """``slide_id -> [N, D]`` float32 features of the usable slides."""
    skipped: dict[str, int]
    """Slides left out by reason (see :attr:`EvalResult.skipped`)."""
    in_dim: int


def metric_names(task_kind: str, metrics: list[str] | None) -> list[str]:
    """The metrics to report (default: the task kind's); unknown task kinds or metric names are one-line errors."""
    if task_kind not in DEFAULT_METRICS:
        raise HistobenchError(f"unknown task kind {task_kind!r}")
    names = list(metrics or DEFAULT_METRICS[task_kind])
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise HistobenchError(f"unknown metric(s) {unknown}; metrics: {', '.join(METRICS)}")
    return names


def labelled_slides(task_kind: str, classes: list[str], manifest: pd.DataFrame, features: Mapping[str, np.ndarray],
                    splits: Splits) -> LabelledSlides:
    """The manifest's usable slides and their bags (``classes`` as strings; ignored for survival)."""
    survival = task_kind == "survival"
    need = ("slide_id", "case_id") + (("time", "event") if survival else ())
    for col in need:
        if col not in manifest.columns:
            raise HistobenchError(f"the manifest has no {col!r} column")
    m = manifest.assign(slide_id=manifest["slide_id"].astype(str), case_id=manifest["case_id"].astype(str))
    m = m.drop_duplicates("slide_id")
    if survival:
        t = pd.to_numeric(m["time"], errors="coerce")
        e = pd.to_numeric(m["event"], errors="coerce")
        ok = t.notna() & e.isin([0, 1]) & (t >= 0)
        m = m.assign(time=t, event=e, y=np.where(ok, 0, -1))
    else:
        m = m.assign(y=_label_index(m, classes).values)
    skipped = {"unlabeled": int((m["y"] < 0).sum()), "missing_features": 0, "empty": 0, "not_in_splits": 0}
    m = m[m["y"] >= 0]
    test_side = splits.table[splits.table["split"] == "test"]
    in_splits = m["slide_id"].isin(test_side["slide_id"]) if splits.slide_level else m["case_id"].isin(test_side["case_id"])
    skipped["not_in_splits"] = int((~in_splits).sum())
    m = m[in_splits]
    bags: dict[str, np.ndarray] = {}
    for sid in m["slide_id"]:
        if sid not in features:
            skipped["missing_features"] += 1
            continue
        arr = np.asarray(features[sid], dtype=np.float32)
        if arr.ndim != 2 or len(arr) == 0:
            skipped["empty"] += 1
            continue
        bags[sid] = arr
    m = m[m["slide_id"].isin(bags)].reset_index(drop=True)
    if m.empty:
        root = getattr(features, "root", None)
        where = f" (feature files in {root})" if root is not None else ""
        counts = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in skipped.items() if n)
        hint = ""
        if skipped["missing_features"] and len(features):
            hint = (f"; manifest slide ids look like {str(manifest['slide_id'].iloc[0])!r}, feature files like "
                    f"{next(iter(features))!r}")
        raise HistobenchError(f"no slide has both a label and features{where}: of {len(manifest)} manifest slides, "
                              f"{counts or 'none usable'}{hint}")
    dims = {a.shape[1] for a in bags.values()}
    if len(dims) != 1:
        raise HistobenchError(f"feature widths differ between slides: {sorted(dims)}")
    return LabelledSlides(m, bags, skipped, dims.pop())


def check_splits(splits: Splits, frame: pd.DataFrame, manifest: pd.DataFrame, task_kind: str, classes: list[str],
                 opts: EvalOptions, check_folds: bool = True) -> tuple[str, pd.DataFrame]:
    """The small-fold check on the usable slides and the leak audit: ``(small-fold line or '', leaks table)``.

    Refuses small folds under ``opts.small_folds == "refuse"``, else warns; warns about leaks.
    """
    small = ""
    if check_folds:
        from histobench.evaluate.folds import describe_small_fold, fold_class_counts

        problem = describe_small_fold(fold_class_counts(splits, frame, task_kind, classes), opts.min_test_per_class, task_kind)
        if problem:
            small = f"split {splits.name!r} ({frame['case_id'].nunique()} patients with features): {problem}"
            if opts.small_folds == "refuse":
                raise HistobenchError(f"{small}; refusing (eval.small_folds=refuse): use fewer folds (-o task.folds=K)")
            warnings.warn(f"{small}; per-fold values are coarse", stacklevel=3)

    leaks = splits.audit(manifest)
    if len(leaks):
        warnings.warn(
            f"splits {splits.name!r} put {leaks['case_id'].nunique()} patient(s) on two sides of a fold "
            f"(e.g. {leaks['case_id'].iloc[0]} in fold {leaks['fold'].iloc[0]}); results are optimistic",
            stacklevel=3,
        )
    return small, leaks


def fold_slides(frame: pd.DataFrame, splits: Splits, k: int, sides: tuple[str, ...]) -> pd.DataFrame:
    """The rows of ``frame`` on the given sides of fold ``k`` (by slide for slide-level splits, else by patient)."""
    if splits.slide_level:
        ids = {s for side in sides for s in splits.slides(k, side) or []}
        return frame[frame["slide_id"].isin(ids)]
    cases = {c for side in sides for c in splits.cases(k, side)}
    return frame[frame["case_id"].isin(cases)]


def classification_frame(test: pd.DataFrame, logits: np.ndarray, classes: list[str], fold: int, seed: int) -> pd.DataFrame:
    """One prediction row per test slide from its logits: ``slide_id, case_id, fold, seed, label, prob_<class>...``."""
    import torch

    frame = pd.DataFrame({"slide_id": test["slide_id"].values, "case_id": test["case_id"].values,
                          "fold": fold, "seed": seed})
    probs = torch.softmax(torch.from_numpy(np.asarray(logits)).double(), dim=1).numpy()
    frame["label"] = test["y"].to_numpy()
    for c, cls in enumerate(classes):
        frame[f"prob_{cls}"] = probs[:, c]
    return frame


def build_result(*, task_kind: str, classes: list[str], names: list[str], frames: list[pd.DataFrame],
                 index: list[tuple[int, int]], opts: EvalOptions, splits: Splits, skipped: dict[str, int],
                 leaks: pd.DataFrame, attention: dict[str, np.ndarray] | None = None, small: str = "") -> EvalResult:
    """An :class:`EvalResult` from per-fold prediction frames (one per ``(fold, seed repeat)`` of ``index``).

    Each frame's metrics are computed on its rows (one row per slide), then every metric's estimators and
    CIs over folds and pooled patients: the same code for every protocol.
    """
    per_fold = [_fold_metrics(frame, task_kind, names, classes) for frame in frames]
    predictions = pd.concat(frames, ignore_index=True)
    summary = _summarise(per_fold, index, predictions, task_kind, classes, opts)
    return EvalResult(
        task_kind=task_kind,
        classes=classes,
        per_fold=per_fold,
        summary=summary,
        predictions=predictions,
        n_skipped=int(sum(skipped.values())),
        split_hash=splits.hash,
        split_name=splits.name,
        skipped=skipped,
        n_leaks=int(leaks["case_id"].nunique()) if len(leaks) else 0,
        attention=dict(attention or {}),
        per_fold_index=list(index),
        small_folds=small,
    )


def evaluate_features(
    *,
    task_kind: str,
    classes: list[str],
    manifest: pd.DataFrame,
    features: Mapping[str, np.ndarray],
    splits: Splits,
    aggregator: Aggregator,
    opts: EvalOptions,
    progress: Progress | None = None,
    metrics: list[str] | None = None,
    attention_per_fold: int = 2,
    check_folds: bool = True,
) -> EvalResult:
    """Evaluate ``features`` (``slide_id -> [N, D]``) on a task over ``splits``.

    ``task_kind`` is ``subtyping``, ``grading`` or ``survival`` (manifest columns ``time`` and ``event``;
    ``classes`` is ignored). ``metrics`` defaults to the task kind's
    :data:`~histobench.evaluate.metrics.DEFAULT_METRICS`; for survival each named metric is also reported
    for the Cox model with a ``cox_`` prefix, plus ``logrank_p``. ``progress(message, done, total)`` is
    called after each fold (all its seeds). Fold ``k``, repeat ``s`` is trained with seed
    ``opts.seed + 1000 * s + k``.

    With ``check_folds`` the test folds are counted on the slides that have features (see
    :mod:`histobench.evaluate.folds`): too few patients of a class refuses under ``opts.small_folds ==
    "refuse"``; under ``"fewer"`` the splits are the caller's choice (``check_fold_sizes`` makes fewer folds
    before pretraining), so the evaluation goes on with a ``UserWarning``, kept in ``EvalResult.small_folds``.
    """
    import torch

    names = metric_names(task_kind, metrics)
    survival = task_kind == "survival"
    classes = [str(c) for c in classes]
    usable = labelled_slides(task_kind, classes, manifest, features, splits)
    m, bags, in_dim = usable.frame, usable.bags, usable.in_dim
    small, leaks = check_splits(splits, m, manifest, task_kind, classes, opts, check_folds)

    # ------------------------------------------------------------------ folds x seeds
    n_out = opts.survival_bins if survival else len(classes)
    index: list[tuple[int, int]] = []
    frames: list[pd.DataFrame] = []
    attention: dict[str, np.ndarray] = {}
    folds = sorted(int(f) for f in splits.table["fold"].unique())
    for done, k in enumerate(folds, start=1):
        train = fold_slides(m, splits, k, ("train", "val"))
        test = fold_slides(m, splits, k, ("test",))
        if train.empty or test.empty:
            raise HistobenchError(f"fold {k} has no {'training' if train.empty else 'test'} slides with features")
        train_bags = [bags[s] for s in train["slide_id"]]
        test_bags = [bags[s] for s in test["slide_id"]]
        if survival:
            if not train["event"].astype(bool).any():
                raise HistobenchError(f"fold {k} has no death among its training patients")
            from histobench.evaluate.survival import bin_index, discrete_time_nll, fit_cox, time_bins

            cuts = time_bins(train["time"].to_numpy(), train["event"].to_numpy(), opts.survival_bins)
            targets = np.stack([bin_index(train["time"].to_numpy(), cuts), train["event"].to_numpy()], axis=1)
            cox = fit_cox(np.stack([b.mean(axis=0) for b in train_bags]), train["time"].to_numpy(),
                          train["event"].to_numpy(), alpha=opts.cox_alpha)
            cox_risk = cox.risk(np.stack([b.mean(axis=0) for b in test_bags]))
        for rep in range(opts.seeds):
            fold_opts = opts.model_copy(update={"seed": opts.seed + 1000 * rep + k})
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(fold_opts.seed)
                module = aggregator.build(in_dim, n_out)
            if survival:
                module = fit_aggregator(module, train_bags, targets, fold_opts, n_outputs=n_out, loss=discrete_time_nll)
            else:
                module = fit_aggregator(module, train_bags, train["y"].to_numpy(), fold_opts, n_outputs=n_out)
            out, att = predict(module, test_bags)
            if survival:
                from histobench.evaluate.survival import risk_from_logits, survival_curves

                frame = pd.DataFrame({"slide_id": test["slide_id"].values, "case_id": test["case_id"].values,
                                      "fold": k, "seed": rep})
                frame["time"] = test["time"].to_numpy(dtype=np.float64)
                frame["event"] = test["event"].to_numpy().astype(int)
                frame["risk"] = risk_from_logits(out)
                frame["cox_risk"] = cox_risk
                for j, col in enumerate(survival_curves(out).T):
                    frame[f"surv_{j}"] = col
            else:
                frame = classification_frame(test, out, classes, k, rep)
            index.append((k, rep))
            frames.append(frame)
            if rep == 0:
                for sid, a in list(zip(test["slide_id"], att))[:attention_per_fold]:
                    if a is not None:
                        attention[sid] = a
        if progress is not None:
            progress(f"fold {k}", done, len(folds))

    # ------------------------------------------------------------------ summary
    return build_result(task_kind=task_kind, classes=classes, names=names, frames=frames, index=index, opts=opts,
                        splits=splits, skipped=usable.skipped, leaks=leaks, attention=attention, small=small)


def _summarise(per_fold: list[dict[str, float]], index: list[tuple[int, int]], predictions: pd.DataFrame,
               task_kind: str, classes: list[str], opts: EvalOptions) -> dict[str, dict[str, Any]]:
    """Each metric's estimators with their own CIs (the keys of :attr:`EvalResult.summary`)."""
    summary: dict[str, dict[str, Any]] = {}
    folds = [k for k, _ in index]
    n_patients = int(predictions["case_id"].nunique())
    for name in per_fold[0]:
        by_fold = pd.Series([f[name] for f in per_fold], dtype=np.float64).groupby(folds).mean()  # seeds averaged
        entry: dict[str, Any] = stats.fold_estimate(by_fold.to_numpy(), name)
        entry["mean"], entry["sd"] = entry["fold_mean"], entry["fold_sd"]
        key = stats.bootstrap_estimator(task_kind, name)
        if key == "pooled_test":  # a p-value: no bootstrap; the test on within-fold median splits
            entry["pooled"] = logrank_pooled(predictions)
        else:
            entry[key] = stats.statistic(predictions, task_kind, name, classes)
            entry[f"{key}_ci_low"], entry[f"{key}_ci_high"] = stats.bootstrap(
                predictions, task_kind, name, classes, n=opts.bootstrap, seed=opts.seed)
            if key == "pooled":
                entry["n_patients"] = n_patients
        summary[name] = entry
    return summary


def survival_metric_names(names: list[str]) -> list[str]:
    """The survival metrics reported for ``names``: each for both models, then ``logrank_p``."""
    return [*names, *(f"cox_{n}" for n in names), "logrank_p"]


def high_risk_groups(predictions: pd.DataFrame, column: str = "risk") -> np.ndarray:
    """True for rows above their own (fold, seed)'s median risk: the Kaplan-Meier / log-rank grouping."""
    keys = [predictions["fold"], predictions["seed"] if "seed" in predictions else 0]
    median = predictions.groupby(keys)[column].transform("median")
    return (predictions[column] > median).to_numpy()


def logrank_pooled(predictions: pd.DataFrame, column: str = "risk") -> float:
    """Log-rank p of high vs low risk, each row grouped by its own fold's median (first seed only)."""
    from histobench.evaluate.survival import logrank_test

    p = predictions[predictions["seed"] == predictions["seed"].min()] if "seed" in predictions else predictions
    return logrank_test(p["time"].to_numpy(), p["event"].to_numpy(), high_risk_groups(p, column))[1]


def _fold_metrics(frame: pd.DataFrame, task_kind: str, names: list[str], classes: list[str]) -> dict[str, float]:
    if task_kind != "survival":
        return {n: stats.metric_on_rows(frame, task_kind, n, classes) for n in names}
    out = {n: stats.metric_on_rows(frame, task_kind, n) for n in survival_metric_names(names)[:-1]}
    out["logrank_p"] = logrank_pooled(frame)
    return out
