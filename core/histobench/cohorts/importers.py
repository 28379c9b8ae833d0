"""Cohort importers: a GDC sample sheet (+ GDC clinical TSV or TCGA-CDR), PANDA's ``train.csv``, a plain CSV.

Each importer returns ``(manifest, ImportReport)``. The manifest has one row per slide with ``slide_id,
case_id, path`` and label columns; the report says what was kept (slides, patients, label counts) and every
row that was dropped, with the reason.

TCGA conventions: a slide's patient is the first 12 characters of its barcode (``TCGA-05-4244``); diagnostic
(FFPE) slides carry ``DX`` in the slide part of the barcode (``...-01Z-00-DX1``), frozen tissue slides ``TS``/
``BS``/``MS``. Survival comes from the TCGA-CDR (``OS``, ``OS.time`` in days) or from a GDC clinical TSV
(``vital_status``, ``days_to_death``, ``days_to_last_follow_up``); times are converted to months
(days / 30.4375).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from histobench.errors import HistobenchError

DAYS_PER_MONTH = 30.4375
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".dcm", ".svslide")
_DX = re.compile(r"-\d{2}[A-Z]-\d{2}-DX[0-9A-Z]*", re.IGNORECASE)
GDC_SHEET_COLUMNS = ("File ID", "File Name", "Project ID", "Case ID")


@dataclass
class ImportReport:
    """What an importer kept and what it dropped, and why."""

    source: str
    kept: int = 0
    patients: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    dropped: list[tuple[str, str]] = field(default_factory=list)

    def drop(self, item: str, reason: str) -> None:
        self.dropped.append((str(item), reason))

    def reasons(self) -> Counter:
        return Counter(reason for _, reason in self.dropped)

    def finish(self, manifest: pd.DataFrame, label: str | None = "label") -> "ImportReport":
        self.kept = len(manifest)
        self.patients = int(manifest["case_id"].nunique()) if len(manifest) else 0
        if label and label in manifest.columns:
            self.labels = {str(k): int(v) for k, v in sorted(manifest[label].astype(str).value_counts().items())}
        return self

    def summary(self) -> str:
        """One line: ``kept 958 slides of 862 patients (LUAD 492, LUSC 466); dropped 3: 2 not DX, 1 no file``."""
        text = f"{self.source}: kept {self.kept} slides of {self.patients} patients"
        if self.labels:
            text += " (" + ", ".join(f"{k} {v}" for k, v in self.labels.items()) + ")"
        if self.dropped:
            text += f"; dropped {len(self.dropped)}: " + ", ".join(f"{n} {r}" for r, n in self.reasons().most_common())
        return text

    def lines(self, limit: int = 20) -> list[str]:
        """One line per dropped item (at most ``limit``), naming it and the reason."""
        out = [f"dropped {item}: {reason}" for item, reason in self.dropped[:limit]]
        if len(self.dropped) > limit:
            out.append(f"... and {len(self.dropped) - limit} more (see the report file)")
        return out

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.dropped, columns=["item", "reason"])


# ---------------------------------------------------------------------------------------------- helpers


def tcga_patient(barcode: str) -> str:
    """``TCGA-05-4244-01Z-00-DX1.<uuid>`` -> ``TCGA-05-4244``."""
    return str(barcode).strip()[:12]


def is_diagnostic(barcode: str) -> bool:
    """True for a diagnostic (FFPE, ``DX``) TCGA slide barcode."""
    return bool(_DX.search(str(barcode)))


def _stem(name: str) -> str:
    name = str(name).strip()
    for suffix in SLIDE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def index_slides(folder: str | Path | None) -> dict[str, Path]:
    """Slide files under ``folder`` (recursively, as the GDC client lays them out: ``<file id>/<name>``),
    by file name and by name without extension."""
    if folder is None:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        raise HistobenchError(f"slide folder {folder} is not a folder")
    found: dict[str, Path] = {}
    for p in folder.rglob("*"):
        if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES:
            found.setdefault(p.name, p)
            found.setdefault(_stem(p.name), p)
    return found


def _read_table(path: str | Path, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise HistobenchError(f"{what} {path} does not exist")
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas' parser errors
        raise HistobenchError(f"{what} {path} is not a readable {'TSV' if sep == chr(9) else 'CSV'}: {exc}") from exc


def _need(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise HistobenchError(f"{what} is missing column(s) {', '.join(missing)} (has: {', '.join(df.columns)})")


def _num(v: str) -> float | None:
    try:
        x = float(str(v).strip())
    except ValueError:
        return None
    return x if x == x else None


def survival_from_cdr(path: str | Path) -> pd.DataFrame:
    """Per patient: ``case_id, project, histological_type, time`` (months), ``event`` from a TCGA-CDR table."""
    cdr = _read_table(path, "TCGA-CDR table")
    _need(cdr, ("bcr_patient_barcode", "type", "OS", "OS.time"), f"TCGA-CDR table {path}")
    out = pd.DataFrame({
        "case_id": cdr["bcr_patient_barcode"].str.strip(),
        "project": cdr["type"].str.strip(),
        "histological_type": cdr.get("histological_type", pd.Series([""] * len(cdr))),
        "time": [(_num(t) / DAYS_PER_MONTH) if _num(t) is not None else None for t in cdr["OS.time"]],
        "event": [_num(e) for e in cdr["OS"]],
    })
    return out.drop_duplicates("case_id")


def survival_from_gdc_clinical(path: str | Path) -> pd.DataFrame:
    """Per patient from a GDC clinical TSV: ``case_id, project, primary_diagnosis, time`` (months), ``event``.

    ``event`` is 1 when ``vital_status`` is Dead (time = ``days_to_death``), else 0 (time =
    ``days_to_last_follow_up``). GDC writes ``'--`` for missing values; a case has one row per treatment, the
    first is used.
    """
    clin = _read_table(path, "GDC clinical table")
    _need(clin, ("case_submitter_id", "vital_status"), f"GDC clinical table {path}")
    rows = []
    for r in clin.drop_duplicates("case_submitter_id").to_dict("records"):
        dead = str(r.get("vital_status", "")).strip().lower() == "dead"
        days = _num(r.get("days_to_death", "")) if dead else _num(r.get("days_to_last_follow_up", ""))
        rows.append({
            "case_id": str(r["case_submitter_id"]).strip(),
            "project": str(r.get("project_id", "")).removeprefix("TCGA-"),
            "primary_diagnosis": r.get("primary_diagnosis", ""),
            "time": None if days is None else days / DAYS_PER_MONTH,
            "event": 1.0 if dead else (0.0 if str(r.get("vital_status", "")).strip().lower() == "alive" else None),
        })
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------- GDC


def import_gdc(sample_sheet: str | Path, *, slides: str | Path | None = None, clinical: str | Path | None = None,
               cdr: str | Path | None = None, diagnostic_only: bool = True) -> tuple[pd.DataFrame, ImportReport]:
    """A manifest from a GDC sample sheet (one row per slide file), with survival from a clinical table.

    ``label`` is the GDC project without ``TCGA-`` (``LUAD``); ``case_id`` the 12-character patient barcode;
    ``slide_id`` the file name without extension. Only diagnostic (``DX``) slides are kept unless
    ``diagnostic_only`` is False. With ``slides``, each file is looked up (recursively) under that folder and
    rows whose file is absent are dropped; without it, ``path`` is ``<File ID>/<File Name>`` (the GDC client's
    layout), relative to the data root. With ``cdr`` or ``clinical``, ``time`` (months) and ``event`` columns
    are added (patients without survival data keep NaN; survival tasks drop them with a reason).
    """
    sheet = _read_table(sample_sheet, "GDC sample sheet")
    _need(sheet, GDC_SHEET_COLUMNS, f"GDC sample sheet {sample_sheet}")
    report = ImportReport(f"GDC sample sheet {Path(sample_sheet).name}")
    files = index_slides(slides)
    surv = None
    if cdr is not None and clinical is not None:
        raise HistobenchError("give either --cdr or --clinical, not both")
    if cdr is not None:
        surv = survival_from_cdr(cdr).set_index("case_id")
    elif clinical is not None:
        surv = survival_from_gdc_clinical(clinical).set_index("case_id")

    rows, seen = [], set()
    for r in sheet.to_dict("records"):
        name = str(r["File Name"]).strip()
        slide_id = _stem(name)
        if not name:
            report.drop(f"file {r['File ID']}", "no File Name")
            continue
        if "Data Type" in r and r["Data Type"] and r["Data Type"].strip() != "Slide Image":
            report.drop(slide_id, f"not a slide image ({r['Data Type']})")
            continue
        if not slide_id.upper().startswith("TCGA-") or len(slide_id) < 12:
            report.drop(slide_id, "not a TCGA slide barcode")
            continue
        if diagnostic_only and not is_diagnostic(slide_id):
            report.drop(slide_id, "not a diagnostic (DX) slide")
            continue
        if slide_id in seen:
            report.drop(slide_id, "listed twice in the sample sheet")
            continue
        case = tcga_patient(slide_id)
        case_col = str(r["Case ID"]).split(",")[0].strip()
        if case_col and case_col != case:
            report.drop(slide_id, f"Case ID {case_col} does not match the barcode's patient {case}")
            continue
        if files:
            hit = files.get(name) or files.get(slide_id)
            if hit is None:
                report.drop(slide_id, f"no file under {slides}")
                continue
            path = str(hit)
        else:
            path = f"{r['File ID']}/{name}"
        seen.add(slide_id)
        row = {"slide_id": slide_id, "case_id": case, "path": path,
               "label": str(r["Project ID"]).strip().removeprefix("TCGA-")}
        if surv is not None:
            if case in surv.index:
                s = surv.loc[case]
                row.update(time=s["time"], event=s["event"])
                for extra in ("histological_type", "primary_diagnosis"):
                    if extra in surv.columns:
                        row[extra] = s[extra]
            else:
                row.update(time=None, event=None)
        rows.append(row)
    if surv is not None:
        no_surv = sorted({r["case_id"] for r in rows if r["time"] is None})
        for case in no_surv:
            report.drop(f"patient {case}", "no survival data in the clinical table (kept, without time/event)")
    cols = ["slide_id", "case_id", "path", "label"] + (["time", "event"] if surv is not None else [])
    manifest = pd.DataFrame(rows)
    manifest = manifest[[*cols, *[c for c in manifest.columns if c not in cols]]] if rows else pd.DataFrame(columns=cols)
    return manifest, report.finish(manifest)


def sample_sheet_from_table(table: pd.DataFrame, slide_col: str = "slide_id", project_col: str = "oncotree_code",
                            prefix: str = "TCGA-") -> pd.DataFrame:
    """A GDC-style sample sheet for a slide table (e.g. HIPT's), for tests and for rebuilding cohorts."""
    names = [s if str(s).endswith(".svs") else f"{s}.svs" for s in table[slide_col].astype(str)]
    return pd.DataFrame({
        "File ID": [f"file-{i:05d}" for i in range(len(names))],
        "File Name": names,
        "Data Category": "Biospecimen",
        "Data Type": "Slide Image",
        "Project ID": [f"{prefix}{p}" for p in table[project_col].astype(str)],
        "Case ID": [tcga_patient(n) for n in names],
        "Sample ID": [n[:16] for n in names],
        "Sample Type": "Primary Tumor",
    })


# ----------------------------------------------------------------------------------------------- PANDA

# ISUP grade group implied by each Gleason score (Epstein et al. 2016); PANDA writes "negative" for benign.
GLEASON_TO_ISUP = {"negative": 0, "0+0": 0, "3+3": 1, "3+4": 2, "4+3": 3, "4+4": 4, "3+5": 4, "5+3": 4,
                   "4+5": 5, "5+4": 5, "5+5": 5}


def import_panda(train_csv: str | Path, *, slides: str | Path | None = None) -> tuple[pd.DataFrame, ImportReport]:
    """A manifest from PANDA's ``train.csv`` (``image_id, data_provider, isup_grade, gleason_score``).

    ``label`` is the ISUP grade as a string ``"0"`` .. ``"5"``. PANDA gives no patient ids, so each image is its
    own ``case_id`` (the challenge's own splits make the same assumption). Rows are dropped for a grade outside
    0-5, a Gleason score that contradicts the ISUP grade (a known mislabelled image), a duplicate id, or, with
    ``slides``, a missing ``<image_id>.tiff``. ``data_provider`` is kept.
    """
    table = _read_table(train_csv, "PANDA train.csv")
    _need(table, ("image_id", "isup_grade"), f"PANDA train.csv {train_csv}")
    report = ImportReport(f"PANDA {Path(train_csv).name}")
    files = index_slides(slides)
    rows, seen = [], set()
    for r in table.to_dict("records"):
        iid = str(r["image_id"]).strip()
        if not iid:
            report.drop("row without image_id", "no image_id")
            continue
        if iid in seen:
            report.drop(iid, "listed twice")
            continue
        grade = _num(r["isup_grade"])
        if grade is None or grade not in range(6):
            report.drop(iid, f"ISUP grade {r['isup_grade']!r} is not 0-5")
            continue
        gleason = str(r.get("gleason_score", "")).strip().lower()
        if gleason and gleason in GLEASON_TO_ISUP and GLEASON_TO_ISUP[gleason] != int(grade):
            report.drop(iid, f"Gleason {gleason} contradicts ISUP grade {int(grade)}")
            continue
        if files:
            hit = files.get(iid) or files.get(f"{iid}.tiff")
            if hit is None:
                report.drop(iid, f"no file under {slides}")
                continue
            path = str(hit)
        else:
            path = f"train_images/{iid}.tiff"
        seen.add(iid)
        rows.append({"slide_id": iid, "case_id": iid, "path": path, "label": str(int(grade)),
                     "data_provider": str(r.get("data_provider", ""))})
    manifest = pd.DataFrame(rows, columns=["slide_id", "case_id", "path", "label", "data_provider"])
    return manifest, report.finish(manifest)


# ------------------------------------------------------------------------------------------------- CSV


def import_csv(csv: str | Path, *, slides: str | Path | None = None, slide_col: str = "slide_id",
               case_col: str = "case_id", path_col: str | None = None, label_col: str | None = "label",
               time_col: str | None = None, event_col: str | None = None) -> tuple[pd.DataFrame, ImportReport]:
    """A manifest from any CSV with a slide id, a patient id and labels (column names given by the caller).

    Paths come from ``path_col`` or, with ``slides``, from looking each slide id up under that folder; rows
    whose slide is not found there are dropped. Missing ids drop the row. Columns are renamed to the manifest's
    (``slide_id, case_id, path, label``/``time, event``); other columns are kept.
    """
    table = _read_table(csv, "cohort CSV")
    wanted = [c for c in (slide_col, case_col, path_col, label_col, time_col, event_col) if c]
    _need(table, wanted, f"cohort CSV {csv}")
    if path_col is None and slides is None:
        raise HistobenchError("import-csv needs --path-col or --slides to find the slide files")
    report = ImportReport(f"CSV {Path(csv).name}")
    files = index_slides(slides)
    rows, seen = [], set()
    rename = {slide_col: "slide_id", case_col: "case_id"}
    for col, new in ((label_col, "label"), (time_col, "time"), (event_col, "event")):
        if col:
            rename[col] = new
    for i, r in enumerate(table.to_dict("records")):
        sid = _stem(str(r[slide_col]).strip())
        if not sid:
            report.drop(f"row {i + 1}", f"empty {slide_col}")
            continue
        if sid in seen:
            report.drop(sid, "listed twice")
            continue
        if not str(r[case_col]).strip():
            report.drop(sid, f"empty {case_col}")
            continue
        if path_col:
            path = str(r[path_col]).strip()
        else:
            hit = files.get(sid) or files.get(str(r[slide_col]).strip())
            if hit is None:
                report.drop(sid, f"no file under {slides}")
                continue
            path = str(hit)
        seen.add(sid)
        row = {rename.get(k, k): v for k, v in r.items() if k != path_col}
        row["slide_id"] = sid
        row["path"] = path
        rows.append(row)
    front = ["slide_id", "case_id", "path"] + [n for c, n in ((label_col, "label"), (time_col, "time"),
                                                              (event_col, "event")) if c]
    manifest = pd.DataFrame(rows)
    if rows:
        manifest = manifest[[*front, *[c for c in manifest.columns if c not in front]]]
    else:
        manifest = pd.DataFrame(columns=front)
    return manifest, report.finish(manifest, "label" if label_col else None)
