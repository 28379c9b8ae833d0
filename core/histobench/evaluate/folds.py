"""The fold-size check: every test fold must hold enough patients of every class before anything is trained.

A per-fold AUC on a test fold of one patient per class can only be 0, 0.5 or 1, and a mean ± sd over such
folds says little. So before pretraining (and again in :func:`histobench.evaluate.protocol.evaluate_features`,
on the slides that have features) each test fold is counted: patients of each class present in the cohort
(a patient's class is the most common label over its slides, as the splits stratify), or, for survival,
patients with an event. ``eval.min_test_per_class`` is the threshold; ``eval.small_folds`` says whether a
cohort too small for the task's fold count is evaluated on fewer folds (announced in one line, the new split
saved and named with its hash) or refused. Nothing happens silently.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from histobench.cohorts.splits import Splits, make_splits
from histobench.errors import HistobenchError

EVENT = "event"
"""The one "class" counted for survival tasks: test patients with an event (a death)."""


def _label_text(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _patient_classes(slides: pd.DataFrame, task_kind: str, classes: list[str] | None) -> pd.Series:
    """``case_id -> class`` (or ``"event"`` / ``""`` for survival) for the given slide rows."""
    cases = slides["case_id"].astype(str)
    if task_kind == "survival":
        event = pd.to_numeric(slides["event"], errors="coerce").fillna(0) == 1
        return event.groupby(cases.values).any().map({True: EVENT, False: ""})
    labels = slides["label"].map(_label_text).where(slides["label"].notna(), None)
    known = labels.isin([str(c) for c in classes]) if classes else labels.notna()
    labels, cases = labels[known], cases[known]

    def mode(v: pd.Series) -> str:
        counts = v.value_counts()
        return min(counts.index[counts == counts.max()])

    return labels.groupby(cases.values).agg(mode) if len(labels) else pd.Series(dtype=str)


def fold_class_counts(splits: Splits, manifest: pd.DataFrame, task_kind: str,
                      classes: list[str] | None = None) -> pd.DataFrame:
    """Test patients of each class in each fold: one row per fold, one column per class of the cohort.

    Only classes some test patient has are columns (a class absent from the whole cohort cannot be asked of
    a fold); for survival the one column is ``event``. Slides of the manifest outside the splits, and labels
    not in ``classes``, are ignored.
    """
    m = manifest.assign(slide_id=manifest["slide_id"].astype(str), case_id=manifest["case_id"].astype(str))
    folds = sorted(int(f) for f in splits.table["fold"].unique())
    rows = {}
    for k in folds:
        if splits.slide_level:
            test = m[m["slide_id"].isin(splits.slides(k, "test") or [])]
        else:
            test = m[m["case_id"].isin(splits.cases(k, "test"))]
        per_class = _patient_classes(test, task_kind, classes)
        rows[k] = per_class[per_class != ""].value_counts()
    counts = pd.DataFrame(rows).T.fillna(0).astype(int) if rows else pd.DataFrame()
    counts = counts.reindex(folds).fillna(0).astype(int)
    order = [EVENT] if task_kind == "survival" else [str(c) for c in (classes or sorted(counts.columns))]
    return counts[[c for c in order if c in counts.columns]]


def smallest_cell(counts: pd.DataFrame) -> tuple[int, str, int] | None:
    """``(fold, class, patients)`` of the emptiest test-fold class (first fold, then first class, on ties)."""
    if counts.empty or counts.shape[1] == 0:
        return None
    low = int(counts.to_numpy().min())
    for k, row in counts.iterrows():
        for c, n in row.items():
            if n == low:
                return int(k), str(c), int(n)
    return None  # pragma: no cover


def describe_small_fold(counts: pd.DataFrame, threshold: int, kind: str) -> str | None:
    """The one-line problem (``None`` when every test fold holds ``threshold`` patients of every class)."""
    cell = smallest_cell(counts)
    if threshold <= 0 or cell is None or cell[2] >= threshold:
        return None
    k, c, n = cell
    what = "with an event" if kind == "survival" else f"of class {c}"
    return (f"with {len(counts)} folds, test fold {k} holds {n} patient{'s' if n != 1 else ''} {what}, fewer than "
            f"eval.min_test_per_class={threshold}")


def check_fold_sizes(splits: Splits, manifest: pd.DataFrame, task, eval_opts, *, workdir: Path | None = None,
                     reporter=None, preset: str | None = None, seed: int = 0) -> Splits:
    """The splits to evaluate on: ``splits`` itself, or fewer folds, or a refusal (see the module docstring).

    ``task`` gives the name, kind, classes and fold count; ``eval_opts`` the threshold
    (``min_test_per_class``; 0 turns the check off) and the policy (``small_folds``: ``fewer`` or
    ``refuse``). Under ``fewer`` the splits are made again with :func:`make_splits` (same stratification and
    ``seed`` as :func:`~histobench.cohorts.splits.task_splits`) with the largest fold count below the task's
    that meets the threshold, or 2 folds when none does; the new splits are named
    ``<k>fold-<stratum>-seed<seed>-from<K>``, saved as ``workdir/splits/<task>-<name>-<hash>.csv`` (where a run
    logs its split file from) and announced in one line through ``reporter.warn`` (a ``UserWarning``
    without a reporter). A published split preset (``preset``, else the task's ``split`` option) is never
    re-made: a too-small one is refused under either policy. Raises :class:`HistobenchError` to refuse.
    """
    threshold = int(eval_opts.min_test_per_class)
    kind = task.task_kind
    classes = [str(c) for c in task.classes] or None
    problem = describe_small_fold(fold_class_counts(splits, manifest, kind, classes), threshold, kind)
    if problem is None:
        return splits
    n_patients = manifest["case_id"].astype(str).nunique()
    head = f"task {task.name} ({n_patients} patients): {problem}"
    published = (preset or getattr(task.options, "split", "default") or "default") != "default"
    stratify = "event" if kind == "survival" else "label"
    if published:
        raise HistobenchError(f"{head} in published split {splits.name!r}, which histobench does not re-make; "
                              f"use -o task.split=default, or -o eval.min_test_per_class=0 to evaluate anyway")
    candidates = []
    for k in range(splits.folds - 1, 1, -1):
        if k > n_patients:
            continue
        fewer = make_splits(manifest, folds=k, seed=seed, stratify=stratify,
                            name=f"{k}fold-{stratify}-seed{seed}-from{splits.folds}")
        candidates.append(fewer)
        if describe_small_fold(fold_class_counts(fewer, manifest, kind, classes), threshold, kind) is None:
            break
    if eval_opts.small_folds == "refuse":
        fits = [c for c in candidates
                if describe_small_fold(fold_class_counts(c, manifest, kind, classes), threshold, kind) is None]
        hint = f"-o task.folds={fits[0].folds}" if fits else "a larger cohort"
        raise HistobenchError(f"{head}; refusing (eval.small_folds=refuse): use {hint}, or -o eval.small_folds=fewer")
    if not candidates:  # the splits already have 2 folds
        raise HistobenchError(f"{head}, and fewer than 2 folds is no cross-validation; use a larger cohort or "
                              f"-o eval.min_test_per_class=0 to evaluate anyway")
    chosen = candidates[-1]
    still = describe_small_fold(fold_class_counts(chosen, manifest, kind, classes), threshold, kind)
    if workdir is not None:
        chosen.save(Path(workdir) / "splits" / f"{task.name}-{chosen.name}-{chosen.hash}.csv")
    message = (f"{head}; evaluating {chosen.folds} folds instead (eval.small_folds=fewer): split {chosen.name}, "
               f"hash {chosen.hash}" + (f" (still short: {still})" if still else ""))
    if reporter is not None:
        reporter.warn(message)
    else:
        warnings.warn(message, stacklevel=2)
    return chosen
