"""Patient-level, stratified, seeded k-fold splits, stored as a CSV with a content hash, and the leakage audit.

A :class:`Splits` is a long table with one row per (fold, side, patient): ``fold, split, case_id`` where
``split`` is ``train``, ``val`` or ``test``. Splits built from a published slide-level table also carry
``slide_id`` (one row per slide), so a patient whose slides fall on two sides is kept twice and the audit
can find it. The hash is the first 16 hex digits of the SHA-256 of the canonical CSV bytes, which are
exactly the bytes :meth:`Splits.save` writes: ``sha256sum splits.csv`` on disk agrees with ``Splits.hash``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from histobench.errors import HistobenchError

SIDES: tuple[str, ...] = ("train", "val", "test")
_SIDE_ORDER = {s: i for i, s in enumerate(SIDES)}


def _canonical(table: pd.DataFrame) -> pd.DataFrame:
    """Columns in a fixed order, fixed dtypes, rows sorted by fold, side (train, val, test), case, slide."""
    missing = {"fold", "split", "case_id"} - set(table.columns)
    if missing:
        raise HistobenchError(f"a splits table needs the columns fold, split, case_id; missing: {', '.join(sorted(missing))}")
    cols = ["fold", "split", "case_id"] + (["slide_id"] if "slide_id" in table.columns else [])
    out = table[cols].copy()
    out["fold"] = out["fold"].astype(int)
    out["split"] = out["split"].astype(str).str.strip().str.lower()
    bad = sorted(set(out["split"]) - set(SIDES))
    if bad:
        raise HistobenchError(f"unknown split side(s) {bad}; sides are {', '.join(SIDES)}")
    for c in cols[2:]:
        out[c] = out[c].astype(str)
    out["_side"] = out["split"].map(_SIDE_ORDER)
    out = out.sort_values(["fold", "_side", *cols[2:]], kind="mergesort").drop(columns="_side")
    return out.reset_index(drop=True)


def _csv_bytes(table: pd.DataFrame) -> bytes:
    return table.to_csv(index=False, lineterminator="\n").encode("utf-8")


@dataclass(eq=False)
class Splits:
    """Fold assignments of patients (and, for published slide-level splits, of slides).

    ``table`` is canonicalised on construction (column order, dtypes, row order), so two equal splits
    always have equal hashes whatever order their rows came in.
    """

    table: pd.DataFrame
    name: str = "splits"
    hash: str = field(init=False)

    def __post_init__(self) -> None:
        self.table = _canonical(self.table)
        self.hash = hashlib.sha256(_csv_bytes(self.table)).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Splits) and other.hash == self.hash

    def __hash__(self) -> int:
        return hash(self.hash)

    def __repr__(self) -> str:
        kind = "slides" if self.slide_level else "patients"
        return f"Splits(name={self.name!r}, folds={self.folds}, {kind}={self.table.iloc[:, -1].nunique()}, hash={self.hash!r})"

    # ---------------------------------------------------------------------------------------- queries

    @property
    def folds(self) -> int:
        """Number of folds."""
        return int(self.table["fold"].nunique())

    @property
    def slide_level(self) -> bool:
        """True when the table assigns slides (``slide_id`` column), not whole patients."""
        return "slide_id" in self.table.columns

    def _rows(self, fold: int, split: str) -> pd.DataFrame:
        if split not in SIDES:
            raise HistobenchError(f"unknown split side {split!r}; sides are {', '.join(SIDES)}")
        t = self.table
        return t[(t["fold"] == int(fold)) & (t["split"] == split)]

    def cases(self, fold: int, split: str) -> list[str]:
        """Sorted, unique patient ids on one side of one fold."""
        return sorted(set(self._rows(fold, split)["case_id"]))

    def slides(self, fold: int, split: str) -> list[str] | None:
        """Slide ids on one side of one fold for a slide-level table; ``None`` for a patient-level one."""
        if not self.slide_level:
            return None
        return sorted(set(self._rows(fold, split)["slide_id"]))

    # ---------------------------------------------------------------------------------------- audit

    def audit(self, manifest: pd.DataFrame | None = None) -> pd.DataFrame:
        """Every patient found on more than one side of a fold: columns ``fold, case_id, sides``.

        For a slide-level table the patient of each slide is taken from ``manifest`` (``slide_id`` ->
        ``case_id``) when one is given, so a published table with wrong patient ids is still audited by the
        manifest's patients. ``sides`` is a comma-separated list in the order train, val, test. An empty
        frame means no leak.
        """
        t = self.table
        if manifest is not None and self.slide_level:
            owner = _slide_owner(manifest)
            mapped = t["slide_id"].map(owner)
            t = t.assign(case_id=mapped.fillna(t["case_id"]))
        sides = t.groupby(["fold", "case_id"], sort=True)["split"].agg(lambda s: sorted(set(s), key=_SIDE_ORDER.get))
        leaks = sides[sides.map(len) > 1]
        return pd.DataFrame(
            {
                "fold": [int(f) for f, _ in leaks.index],
                "case_id": [str(c) for _, c in leaks.index],
                "sides": [",".join(v) for v in leaks.values],
            },
            columns=["fold", "case_id", "sides"],
        )

    # ---------------------------------------------------------------------------------------- files

    def save(self, path: str | os.PathLike) -> Path:
        """Write the canonical CSV atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(_csv_bytes(self.table))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, name: str | None = None) -> "Splits":
        """Read a splits CSV (ids are kept as strings). ``name`` defaults to the file's stem."""
        path = Path(path)
        table = pd.read_csv(path, dtype={"case_id": str, "slide_id": str, "split": str}, keep_default_na=False)
        return cls(table, name=name or path.stem)

    # ---------------------------------------------------------------------------------------- builders

    @classmethod
    def from_slide_table(cls, df: pd.DataFrame, manifest: pd.DataFrame, name: str = "published") -> "Splits":
        """Build from a slide-level table (``fold, split, slide_id``), mapping slides to patients via ``manifest``.

        One row per slide is kept, so a patient with slides on two sides shows up in :meth:`audit`. Slides the
        manifest does not know raise, naming a few of them.
        """
        missing_cols = {"fold", "split", "slide_id"} - set(df.columns)
        if missing_cols:
            raise HistobenchError(f"a slide-level split table needs fold, split, slide_id; missing {sorted(missing_cols)}")
        owner = _slide_owner(manifest)
        slide = df["slide_id"].astype(str)
        unknown = sorted(set(slide) - set(owner.index))
        if unknown:
            raise HistobenchError(
                f"{len(unknown)} slide(s) of the split table are not in the manifest, e.g. {', '.join(unknown[:3])}"
            )
        table = pd.DataFrame({"fold": df["fold"], "split": df["split"], "case_id": slide.map(owner), "slide_id": slide})
        return cls(table, name=name)


def _slide_owner(manifest: pd.DataFrame) -> pd.Series:
    """``slide_id -> case_id`` from a manifest."""
    for col in ("slide_id", "case_id"):
        if col not in manifest.columns:
            raise HistobenchError(f"the manifest has no {col!r} column")
    m = manifest.drop_duplicates("slide_id")
    return pd.Series(m["case_id"].astype(str).values, index=m["slide_id"].astype(str).values)


def _patient_strata(manifest: pd.DataFrame, stratify: str | None) -> pd.Series:
    """One stratum per patient (the most common value of ``stratify`` over its slides; ties: the smallest)."""
    if "case_id" not in manifest.columns:
        raise HistobenchError("the manifest has no 'case_id' column")
    cases = manifest["case_id"].astype(str)
    if stratify is None:
        return pd.Series("all", index=sorted(set(cases)))
    if stratify not in manifest.columns:
        raise HistobenchError(f"cannot stratify on {stratify!r}: the manifest has no such column")
    values = manifest[stratify].astype(str).where(manifest[stratify].notna(), "<NA>")

    def mode(v: pd.Series) -> str:
        counts = v.value_counts()
        return min(counts.index[counts == counts.max()])

    return values.groupby(cases.values).agg(mode).sort_index()


def make_splits(
    manifest: pd.DataFrame,
    *,
    folds: int,
    seed: int,
    stratify: str | None = "label",
    val_fraction: float = 0.0,
    name: str | None = None,
) -> Splits:
    """Patient-level, stratified, seeded k-fold splits.

    Patients (``case_id``) are the unit: each is in exactly one test fold, and within a fold on exactly one
    side, so the splits are leak-free by construction. A patient's stratum is the most common value of the
    ``stratify`` column over its slides (``label`` for classification; ``event`` for survival; ``None``: no
    stratification). Within each stratum the patients are shuffled with ``seed`` and dealt to the folds in
    turn, the dealing continuing across strata, so fold sizes differ by at most one and each stratum's count
    per fold by at most one. With ``val_fraction > 0`` a stratified share of each fold's training patients
    (at least one) is moved to ``val``.
    """
    if folds < 2:
        raise HistobenchError(f"folds must be at least 2 (got {folds})")
    if not 0.0 <= val_fraction < 1.0:
        raise HistobenchError(f"val_fraction must be in [0, 1) (got {val_fraction})")
    strata = _patient_strata(manifest, stratify)
    if len(strata) < folds:
        raise HistobenchError(f"{len(strata)} patients cannot fill {folds} folds")
    rng = np.random.default_rng(seed)

    test_fold: dict[str, int] = {}
    turn = int(rng.integers(folds))
    for stratum in sorted(set(strata.values)):
        members = np.array(sorted(strata.index[strata.values == stratum]))
        for case in members[rng.permutation(len(members))]:
            test_fold[case] = turn
            turn = (turn + 1) % folds

    rows: list[tuple[int, str, str]] = []
    for k in range(folds):
        train = sorted(c for c, f in test_fold.items() if f != k)
        val: set[str] = set()
        if val_fraction > 0:
            fold_rng = np.random.default_rng([seed, k])
            train_strata = strata.loc[train]
            for stratum in sorted(set(train_strata.values)):
                members = np.array(sorted(train_strata.index[train_strata.values == stratum]))
                take = int(round(val_fraction * len(members)))
                val.update(members[fold_rng.permutation(len(members))[:take]].tolist())
            if not val and len(train) > 1:
                val.add(train[int(fold_rng.integers(len(train)))])
        for case, f in test_fold.items():
            side = "test" if f == k else ("val" if case in val else "train")
            rows.append((k, side, case))
    table = pd.DataFrame(rows, columns=["fold", "split", "case_id"])
    strat = stratify or "none"
    return Splits(table, name=name or f"{folds}fold-{strat}-seed{seed}" + (f"-val{val_fraction:g}" if val_fraction else ""))


# ------------------------------------------------------------------------------------ published presets


def read_published_table(folder: str | os.PathLike) -> pd.DataFrame:
    """A folder of published split files (``splits_0.csv`` ... as CLAM/HIPT write them) as a long table.

    Each file holds one fold, one column per side (``train``, ``val``, ``test``; padded with blanks), the first
    unnamed column being a row index. Returns ``fold, split, id`` (``id`` a slide or a case id, as published).
    A published table without a ``test`` column uses ``val`` as the held-out side and reads it as ``test``.
    """
    folder = Path(folder)
    files = sorted(folder.glob("splits_*.csv"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    if not files:
        raise HistobenchError(f"split preset folder {folder} has no splits_<k>.csv files")
    rows = []
    for f in files:
        k = int(f.stem.rsplit("_", 1)[-1])
        table = pd.read_csv(f, dtype=str, keep_default_na=False)
        sides = [c for c in table.columns if c.strip().lower() in SIDES]
        if not sides:
            raise HistobenchError(f"split file {f} has no train/val/test column (has {list(table.columns)})")
        rename = {}
        if "test" not in [c.strip().lower() for c in sides]:
            rename = {"val": "test"}
        for col in sides:
            side = rename.get(col.strip().lower(), col.strip().lower())
            for v in table[col]:
                v = str(v).strip()
                if v:
                    rows.append((k, side, v.removesuffix(".svs")))
    return pd.DataFrame(rows, columns=["fold", "split", "id"])


def load_preset(folder: str | os.PathLike, manifest: pd.DataFrame, name: str) -> tuple[Splits, int]:
    """A published split preset restricted to the manifest: ``(Splits, ids not in the manifest)``.

    Slide ids (longer than a 12-character TCGA patient barcode, or any id found in the manifest's ``slide_id``)
    give a slide-level :class:`Splits` built with :meth:`Splits.from_slide_table`, so the audit sees a patient
    whose slides sit on two sides. Case ids give a patient-level table. Ids the manifest lacks (slides not
    downloaded) are left out and counted.
    """
    long = read_published_table(folder)
    slide_ids = set(manifest["slide_id"].astype(str))
    case_ids = set(manifest["case_id"].astype(str))
    ids = set(long["id"])
    slide_level = bool(ids & slide_ids) or not (ids & case_ids)
    present = long["id"].isin(slide_ids if slide_level else case_ids)
    dropped = int(long.loc[~present, "id"].nunique())
    long = long[present]
    if long.empty:
        raise HistobenchError(f"split preset {name!r}: none of its ids is in the cohort's manifest")
    if slide_level:
        splits = Splits.from_slide_table(long.rename(columns={"id": "slide_id"}), manifest, name=name)
    else:
        splits = Splits(long.rename(columns={"id": "case_id"}), name=name)
    return splits, dropped


def task_splits(task, manifest: pd.DataFrame, *, workdir: Path, preset: str | None = None, seed: int = 0,
                val_fraction: float = 0.0) -> Splits:
    """The splits a task is evaluated on, saved as ``workdir/splits/<task>-<name>-<hash>.csv``.

    ``preset`` (else the task's ``split`` option, when it is not ``"default"``) names a published split shipped
    by the task (``task.split_presets``: name -> folder of ``splits_<k>.csv``), restricted to the manifest's
    slides. Otherwise histobench's own: patient-level, seeded k-fold with ``task.options.folds`` folds,
    stratified by ``label`` (by ``event`` for survival tasks). A cohort of a single class (no death, for
    survival) is refused first, in one line.
    """
    from histobench.cohorts.status import check_cohort_labels

    check_cohort_labels(manifest, task)  # one class only, or no death: no fold can be evaluated
    name = preset or getattr(task.options, "split", "default") or "default"
    if name != "default":
        presets = getattr(type(task), "split_presets", {}) or {}
        if name not in presets:
            avail = ", ".join(["default", *sorted(presets)])
            raise HistobenchError(f"task {task.name} has no split preset {name!r}; available: {avail}")
        splits, _ = load_preset(presets[name], manifest, name=name)
    else:
        stratify = "event" if task.task_kind == "survival" else "label"
        splits = make_splits(manifest, folds=task.options.folds, seed=seed, stratify=stratify,
                             val_fraction=val_fraction)
    splits.save(Path(workdir) / "splits" / f"{task.name}-{splits.name}-{splits.hash}.csv")
    return splits


def leaks_per_fold(splits: Splits, manifest: pd.DataFrame | None = None) -> dict[int, int]:
    """Number of patients on more than one side, for every fold (zeros included)."""
    audit = splits.audit(manifest)
    counts = audit.groupby("fold")["case_id"].nunique().to_dict() if len(audit) else {}
    return {int(k): int(counts.get(k, 0)) for k in sorted(splits.table["fold"].unique())}


def check_leaks(splits: Splits, manifest: pd.DataFrame | None = None, *, allow_leaks: bool = False) -> int:
    """Refuse a split where a patient sits on two sides of a fold, unless ``allow_leaks``.

    Returns the number of (fold, patient) leaks, which the caller logs (``split_leaks``) either way.
    """
    audit = splits.audit(manifest)
    n = len(audit)
    if n and not allow_leaks:
        first = audit.iloc[0]
        raise HistobenchError(
            f"split {splits.name!r} leaks: {n} patient-fold(s) with slides on two sides, e.g. {first['case_id']} "
            f"in fold {first['fold']} ({first['sides']}); run `histobench splits audit` for all of them, or pass "
            f"--allow-leaky-splits to evaluate anyway"
        )
    return n
