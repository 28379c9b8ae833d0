"""Per-slide status: what happened to each slide at each stage, and why a slide was left out.

A run never stops at the first bad slide (unless ``--fail-fast``): each problem becomes one
:class:`StatusRecord` (``slide_id, stage, status, reason``) and one line naming the slide and the reason.
:class:`StatusTable` collects them and appends them to a CSV (``status.csv`` in the run's work folder), so
the records of earlier stages, and of earlier runs, are never overwritten.

:func:`check_slide` looks at one slide file (exists, opens, has a pixel size, decodes, has tissue, is
brightfield) and :func:`validate_manifest_rows` at the manifest's rows (ids, paths, labels, survival times).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from histobench.errors import HistobenchError

Status = Literal["ok", "skipped", "error"]
STATUSES: tuple[str, ...] = ("ok", "skipped", "error")
COLUMNS: tuple[str, ...] = ("slide_id", "stage", "status", "reason")


@dataclass(frozen=True)
class StatusRecord:
    """What happened to one slide at one stage."""

    slide_id: str
    stage: str
    status: str
    reason: str = ""

    def line(self) -> str:
        """One line naming the slide and the reason: ``slide S (stage tile): skipped: no tissue``."""
        text = f"slide {self.slide_id} ({self.stage}): {self.status}"
        return f"{text}: {self.reason}" if self.reason else text


class StatusTable:
    """An append-only list of :class:`StatusRecord` s, saved as a CSV that grows across stages and runs."""

    def __init__(self, records: Iterable[StatusRecord] = ()) -> None:
        self.records: list[StatusRecord] = list(records)
        self._saved: dict[Path, int] = {}  # file -> how many of our records it already holds

    def add(self, slide_id: str, stage: str, status: str = "ok", reason: str = "") -> StatusRecord:
        """Record one slide's outcome; ``status`` is ``ok``, ``skipped`` or ``error``."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        rec = StatusRecord(str(slide_id), str(stage), status, " ".join(str(reason).split()))
        self.records.append(rec)
        return rec

    def extend(self, problems: Iterable[tuple[str, str]], stage: str, status: str = "skipped") -> list[StatusRecord]:
        """Record ``(slide_id, reason)`` pairs, e.g. from :func:`validate_manifest_rows`."""
        return [self.add(sid, stage, status, reason) for sid, reason in problems]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def problems(self) -> list[StatusRecord]:
        """Records that are not ``ok``."""
        return [r for r in self.records if r.status != "ok"]

    def count(self, status: str, stage: str | None = None) -> int:
        return sum(r.status == status and (stage is None or r.stage == stage) for r in self.records)

    def summary(self) -> str:
        """One line: ``status: 10 slides; ok 8, skipped 1 (tile: 1), error 1 (open: 1)``."""
        slides = {r.slide_id for r in self.records}
        parts = []
        for status in STATUSES:
            recs = [r for r in self.records if r.status == status]
            if not recs and status != "ok":
                continue
            part = f"{status} {len(recs)}"
            if status != "ok" and recs:
                stages: dict[str, int] = {}
                for r in recs:
                    stages[r.stage] = stages.get(r.stage, 0) + 1
                part += " (" + ", ".join(f"{k}: {v}" for k, v in stages.items()) + ")"
            parts.append(part)
        return f"status: {len(slides)} slides; " + ", ".join(parts)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([asdict(r) for r in self.records], columns=list(COLUMNS))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Append the records not yet written to ``path`` (a CSV), atomically.

        The existing file is read, the new records are added after its rows, and the whole is written to a
        temporary file that then replaces it: a crash leaves the old file intact, never a half-written one.
        Saving twice writes each record once.
        """
        import pandas as pd

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        done = self._saved.get(path.resolve(), 0)
        new = self.to_frame().iloc[done:]
        if path.exists():
            try:
                old = pd.read_csv(path, dtype=str, keep_default_na=False)
            except Exception as exc:  # pandas raises several kinds on a damaged CSV
                raise HistobenchError(f"status file {path} is unreadable ({exc}); move it away to start a new one") from exc
            if list(old.columns) != list(COLUMNS):
                raise HistobenchError(f"status file {path} has columns {list(old.columns)}, expected {list(COLUMNS)}")
            table = pd.concat([old, new.astype(str)], ignore_index=True)
        else:
            table = new
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
                table.to_csv(fh, index=False, lineterminator="\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._saved[path.resolve()] = len(self.records)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "StatusTable":
        import pandas as pd

        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        return cls(StatusRecord(r.slide_id, r.stage, r.status, r.reason) for r in df.itertuples())


# --------------------------------------------------------------------------------------------- slide checks


def _get(row: Any, key: str, default: Any = None) -> Any:
    if isinstance(row, dict):
        return row.get(key, default)
    return getattr(row, key, default)


def check_slide(row: Any, *, mpp: float | None = None, brightfield_only: bool = True,
                thumbnail_side: int = 512, warnings: list[str] | None = None) -> str | None:
    """Why the slide of one manifest row cannot be used, or None when it can.

    ``row`` is anything with a ``path`` (a dict, a pandas row or namedtuple). Checked in order: the file
    exists; OpenSlide opens it (not corrupt, a supported format); its pixel size is known (metadata or
    ``mpp``); its lowest-resolution level and a few level-0 regions decode (a truncated file fails here);
    its thumbnail has tissue; it is a brightfield slide (a fluorescence scan is refused when
    ``brightfield_only``). Reasons that do not make the slide unusable (e.g. suspect DICOM colours) are
    appended to ``warnings`` when a list is given.
    """
    from histobench.slides.reader import open_slide
    from histobench.slides.tissue import slide_kind, tissue_mask

    raw = _get(row, "path")
    if raw is None or (isinstance(raw, float) and math.isnan(raw)) or str(raw).strip() == "":
        return "no path in the manifest"
    path = Path(str(raw))
    if not path.exists():
        return f"missing file {path}"
    try:
        slide = open_slide(path, mpp=mpp)
    except HistobenchError as err:
        return f"unreadable slide: {str(err).split(': ', 1)[-1]}"
    with slide:
        try:
            slide.mpp
        except HistobenchError:
            return "no resolution metadata (µm/px); pass --mpp to set it"
        try:
            thumb, _ = slide.thumbnail(thumbnail_side)
            w, h = slide.dimensions
            side = max(1, min(64, w, h))
            for x, y in ((0, 0), (w // 2, h // 2), (w - side, h - side)):
                slide.read_region(x, y, 0, side, side)
        except HistobenchError as err:
            return f"corrupt or truncated slide: {str(err).split(': ', 1)[-1]}"
        kind = slide_kind(thumb)
        if kind == "fluorescence" and brightfield_only:
            return "not a brightfield H&E slide (dark background: fluorescence)"
        if kind == "empty" or not tissue_mask(thumb).any():
            return "no tissue found on the thumbnail"
        if warnings is not None:
            try:
                note = slide.colour_warning()
            except HistobenchError:
                note = None
            if note:
                warnings.append(note)
    return None


# ------------------------------------------------------------------------------------------- manifest rows


def _missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return str(v).strip() in ("", "nan", "NaN", "None", "'--", "--")


def validate_manifest_rows(df, task: Any = None, *, known_slide_ids: Iterable[str] | None = None,
                           check_known_ids: bool = True, source: str | None = None):
    """Split a manifest into usable rows and problems: ``(good_df, [(slide_id, reason), ...])``.

    A missing required column (``slide_id, case_id, path``, then ``label`` or ``time, event`` for the task's
    kind) makes the whole manifest unusable and raises, naming the column and ``source`` (the file). Row by
    row, a row is dropped for: a missing slide id (reported as ``row N``), a slide id seen before, an id not in
    ``known_slide_ids`` (or the task's ``known_slide_ids()`` when it has one; ``check_known_ids=False`` skips
    this, e.g. for a ``--demo`` cohort), a missing case id or path, a label that is not one of
    ``task.classes``; for survival a missing, non-numeric, non-finite, zero or negative ``time`` and an
    ``event`` other than 0 or 1. Then every slide of a patient whose slides disagree (two labels, or two
    survival outcomes) is dropped too. The good rows come back with string ids and, for survival, float
    ``time`` and int ``event``.
    """
    import pandas as pd

    kind = getattr(task, "task_kind", None)
    label_cols = ["time", "event"] if kind == "survival" else (["label"] if kind else [])
    missing_cols = [c for c in ("slide_id", "case_id", "path", *label_cols) if c not in df.columns]
    if missing_cols:
        name = getattr(task, "name", "")
        where = source or f"manifest{' of task ' + name if name else ''}"
        raise HistobenchError(
            f"{where} is missing column(s) {', '.join(missing_cols)}{' for task ' + name if source and name else ''} "
            f"(has: {', '.join(map(str, df.columns))})"
        )
    if known_slide_ids is None and check_known_ids and task is not None and hasattr(task, "known_slide_ids"):
        known_slide_ids = task.known_slide_ids()
    known = set(map(str, known_slide_ids)) if (known_slide_ids is not None and check_known_ids) else None
    classes = [str(c) for c in getattr(task, "classes", ())] if kind in ("subtyping", "grading") else []

    problems: list[tuple[str, str]] = []
    keep: list[int] = []
    seen: set[str] = set()
    times: dict[int, float] = {}
    events: dict[int, int] = {}
    for i, row in enumerate(df.to_dict("records")):
        sid = row["slide_id"]
        if _missing(sid):
            problems.append((f"row {i + 1}", "no slide_id"))
            continue
        sid = str(sid).strip()
        if sid in seen:
            problems.append((sid, "slide_id listed more than once (later row dropped)"))
            continue
        seen.add(sid)
        if known is not None and sid not in known:
            problems.append((sid, "unknown slide_id (not in the task's label table)"))
            continue
        if _missing(row["case_id"]):
            problems.append((sid, "no case_id"))
            continue
        if _missing(row["path"]):
            problems.append((sid, "no path"))
            continue
        if classes:
            label = row["label"]
            if _missing(label):
                problems.append((sid, "no label"))
                continue
            text = _label_text(label)
            if text not in classes:
                problems.append((sid, f"unknown label {text!r} (classes: {', '.join(classes)})"))
                continue
        if kind == "survival":
            t = pd.to_numeric(pd.Series([row["time"]]), errors="coerce").iloc[0]
            if pd.isna(t) or not math.isfinite(float(t)):
                problems.append((sid, f"survival time is missing or not a number ({row['time']!r})"))
                continue
            if float(t) <= 0:
                problems.append((sid, f"survival time must be positive, got {float(t):g}"))
                continue
            e = pd.to_numeric(pd.Series([row["event"]]), errors="coerce").iloc[0]
            if pd.isna(e) or float(e) not in (0.0, 1.0):
                problems.append((sid, f"event must be 0 (censored) or 1 (death), got {row['event']!r}"))
                continue
            times[i], events[i] = float(t), int(e)
        keep.append(i)

    keep = _drop_conflicting_patients(df, keep, kind, classes, times, events, problems)
    good = df.iloc[keep].copy()
    good["slide_id"] = good["slide_id"].astype(str).str.strip()
    good["case_id"] = good["case_id"].astype(str).str.strip()
    if classes:
        good["label"] = [_label_text(v) for v in good["label"]]
    if kind == "survival":
        good["time"] = [times[i] for i in keep]
        good["event"] = [events[i] for i in keep]
    return good.reset_index(drop=True), problems


def _drop_conflicting_patients(df, keep: list[int], kind: str | None, classes: list[str], times: dict[int, float],
                               events: dict[int, int], problems: list[tuple[str, str]]) -> list[int]:
    """Drop every slide of a patient whose slides disagree on the patient's label (or survival time and event).

    A patient has one diagnosis and one survival outcome; two values mean the manifest is wrong somewhere, and
    neither can be trusted, so all of that patient's slides are recorded and dropped.
    """
    if not keep or not (classes or kind == "survival"):
        return keep
    rows = df.to_dict("records")
    values: dict[str, dict[str, list[str]]] = {}  # case -> value -> slide ids
    for i in keep:
        case = str(rows[i]["case_id"]).strip()
        sid = str(rows[i]["slide_id"]).strip()
        value = _label_text(rows[i]["label"]) if classes else f"time {times[i]:g}, event {events[i]}"
        values.setdefault(case, {}).setdefault(value, []).append(sid)
    bad = {case: seen for case, seen in values.items() if len(seen) > 1}
    if not bad:
        return keep
    what = "labels" if classes else "survival outcomes"
    for i in keep:
        case = str(rows[i]["case_id"]).strip()
        if case in bad:
            detail = "; ".join(f"{v!r} on {', '.join(sids)}" for v, sids in sorted(bad[case].items()))
            problems.append((str(rows[i]["slide_id"]).strip(),
                             f"patient {case} has conflicting {what} ({detail}); all its slides dropped"))
    return [i for i in keep if str(rows[i]["case_id"]).strip() not in bad]


def check_cohort_labels(df, task: Any, source: str = "") -> None:
    """Refuse a cohort that cannot be evaluated whatever the folds: one class only, or no death at all.

    ``df`` holds the usable rows (after :func:`validate_manifest_rows`). Subtyping and grading need patients of
    at least two classes; survival needs at least one event, or no c-index is defined.
    """
    kind = getattr(task, "task_kind", None)
    where = source or f"the cohort of task {getattr(task, 'name', '?')}"
    if df is None or len(df) == 0:
        raise HistobenchError(f"{where} is empty after filtering")
    if kind in ("subtyping", "grading") and "label" in df.columns:
        per_class = df.drop_duplicates("case_id")["label"].astype(str).value_counts()
        if len(per_class) < 2:
            only = per_class.index[0] if len(per_class) else "?"
            raise HistobenchError(
                f"{where} has a single class ({only!r}, {int(per_class.sum())} patients); task "
                f"{getattr(task, 'name', '?')} needs at least two of {', '.join(map(str, getattr(task, 'classes', ())))}")
    if kind == "survival" and "event" in df.columns:
        events = _numeric(df["event"])
        if not (events == 1).any():
            raise HistobenchError(f"{where} has no death (event 1) among its {len(df)} slides: no c-index is defined")


def _numeric(series):
    import pandas as pd

    return pd.to_numeric(series, errors="coerce")


def _label_text(v: Any) -> str:
    """A label as the task's class string: ``3.0`` read from a CSV becomes ``"3"``."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()
