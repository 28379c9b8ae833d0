"""Cohort importers, manifest row checks, the per-slide status table and slide checks on bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histobench.cohorts.importers import (
    import_csv,
    import_gdc,
    import_panda,
    is_diagnostic,
    sample_sheet_from_table,
    tcga_patient,
)
from histobench.cohorts.status import StatusTable, check_slide, validate_manifest_rows
from histobench.errors import HistobenchError

# Real slides copied from the project's shared data (licenses in tests/data/README.md); TCGA tables shipped
# with the tcga plugin.
REAL = Path(__file__).resolve().parent / "data" / "slides"
TCGA_DATA = Path(__file__).resolve().parents[1] / "plugins" / "histobench_tcga" / "data"
HIPT = TCGA_DATA / "hipt_tcga_lung.csv"
CDR = TCGA_DATA / "tcga_cdr_os.csv"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real test slides not found at {REAL}")
needs_tcga = pytest.mark.skipif(not HIPT.exists(), reason=f"TCGA tables not found at {HIPT.parent}")


class _Task:
    """A stand-in task for the manifest checks."""

    def __init__(self, kind: str, classes=()):
        self.task_kind, self.classes, self.name = kind, classes, "t"


# ------------------------------------------------------------------------------------------------ GDC


def test_barcode_helpers():
    assert tcga_patient("TCGA-05-4244-01Z-00-DX1.d4ff32cd") == "TCGA-05-4244"
    assert is_diagnostic("TCGA-05-4244-01Z-00-DX1.d4ff32cd")
    assert not is_diagnostic("TCGA-05-4244-01A-01-TS1.2cd")


@needs_tcga
def test_gdc_sample_sheet_from_hipt_imports_958_slides(tmp_path):
    sheet = sample_sheet_from_table(pd.read_csv(HIPT))
    sheet.to_csv(tmp_path / "sheet.tsv", sep="\t", index=False)
    manifest, report = import_gdc(tmp_path / "sheet.tsv", cdr=CDR)
    assert report.kept == len(manifest) == 958
    assert report.patients == manifest["case_id"].nunique() == 862
    assert report.labels == {"LUAD": 492, "LUSC": 466}
    assert report.dropped == []
    assert (manifest["case_id"] == manifest["slide_id"].str[:12]).all()
    assert manifest["time"].notna().mean() > 0.95 and set(manifest["event"].dropna()) <= {0.0, 1.0}
    assert "kept 958 slides of 862 patients (LUAD 492, LUSC 466)" in report.summary()


def test_gdc_keeps_dx_only_finds_files_and_says_why(tmp_path):
    slides = tmp_path / "slides" / "uuid-1"
    slides.mkdir(parents=True)
    (slides / "TCGA-AA-0001-01Z-00-DX1.abc.svs").write_bytes(b"x")
    sheet = pd.DataFrame({
        "File ID": ["uuid-1", "uuid-2", "uuid-3", "uuid-4", "uuid-5"],
        "File Name": ["TCGA-AA-0001-01Z-00-DX1.abc.svs", "TCGA-AA-0002-01A-01-TS1.def.svs",
                      "TCGA-AA-0003-01Z-00-DX1.ghi.svs", "TCGA-AA-0001-01Z-00-DX1.abc.svs", "notes.txt"],
        "Data Category": "Biospecimen",
        "Data Type": ["Slide Image"] * 4 + ["Clinical Supplement"],
        "Project ID": "TCGA-LUAD",
        "Case ID": ["TCGA-AA-0001", "TCGA-AA-0002", "TCGA-AA-0003", "TCGA-AA-0001", "TCGA-AA-0009"],
        "Sample ID": "s", "Sample Type": "Primary Tumor",
    })
    sheet.to_csv(tmp_path / "s.tsv", sep="\t", index=False)
    manifest, report = import_gdc(tmp_path / "s.tsv", slides=tmp_path / "slides")
    assert list(manifest["slide_id"]) == ["TCGA-AA-0001-01Z-00-DX1.abc"]
    assert Path(manifest["path"][0]).exists()
    reasons = dict(report.dropped)
    assert reasons["TCGA-AA-0002-01A-01-TS1.def"] == "not a diagnostic (DX) slide"
    assert reasons["TCGA-AA-0003-01Z-00-DX1.ghi"].startswith("no file under")
    assert "listed twice" in reasons["TCGA-AA-0001-01Z-00-DX1.abc"]
    assert "not a slide image" in reasons["notes.txt"]
    # without --slides every DX row is kept with the GDC client's layout as its path
    manifest, _ = import_gdc(tmp_path / "s.tsv")
    assert list(manifest["path"]) == ["uuid-1/TCGA-AA-0001-01Z-00-DX1.abc.svs", "uuid-3/TCGA-AA-0003-01Z-00-DX1.ghi.svs"]


def test_gdc_clinical_tsv_survival(tmp_path):
    sheet = sample_sheet_from_table(pd.DataFrame({"slide_id": ["TCGA-AA-0001-01Z-00-DX1.a", "TCGA-AA-0002-01Z-00-DX1.b"],
                                                  "oncotree_code": ["LUAD", "LUAD"]}))
    sheet.to_csv(tmp_path / "s.tsv", sep="\t", index=False)
    clin = pd.DataFrame({"case_submitter_id": ["TCGA-AA-0001", "TCGA-AA-0001", "TCGA-AA-0002"],
                         "project_id": "TCGA-LUAD", "vital_status": ["Dead", "Dead", "Alive"],
                         "days_to_death": ["365.25", "365.25", "'--"], "days_to_last_follow_up": ["'--", "'--", "730.5"]})
    clin.to_csv(tmp_path / "clinical.tsv", sep="\t", index=False)
    manifest, _ = import_gdc(tmp_path / "s.tsv", clinical=tmp_path / "clinical.tsv")
    assert manifest["time"].round(2).tolist() == [12.0, 24.0] and manifest["event"].tolist() == [1.0, 0.0]
    with pytest.raises(HistobenchError, match="either --cdr or --clinical"):
        import_gdc(tmp_path / "s.tsv", clinical=tmp_path / "clinical.tsv", cdr=tmp_path / "clinical.tsv")


def test_gdc_sheet_without_columns_names_them(tmp_path):
    pd.DataFrame({"File Name": ["a.svs"]}).to_csv(tmp_path / "s.tsv", sep="\t", index=False)
    with pytest.raises(HistobenchError, match="missing column\\(s\\) File ID, Project ID, Case ID"):
        import_gdc(tmp_path / "s.tsv")


# ----------------------------------------------------------------------------------------- PANDA, CSV


def test_panda_import(tmp_path):
    (tmp_path / "train_images").mkdir()
    for i in ("a", "b", "c"):
        (tmp_path / "train_images" / f"{i}.tiff").write_bytes(b"x")
    pd.DataFrame({"image_id": ["a", "b", "c", "d", "e"], "data_provider": "radboud",
                  "isup_grade": ["0", "4", "2", "1", "7"],
                  "gleason_score": ["negative", "4+4", "4+3", "3+3", "5+5"]}).to_csv(tmp_path / "train.csv", index=False)
    manifest, report = import_panda(tmp_path / "train.csv", slides=tmp_path / "train_images")
    assert list(manifest["slide_id"]) == ["a", "b"] and list(manifest["label"]) == ["0", "4"]
    assert (manifest["case_id"] == manifest["slide_id"]).all()
    reasons = dict(report.dropped)
    assert reasons["c"] == "Gleason 4+3 contradicts ISUP grade 2"
    assert reasons["d"].startswith("no file under")
    assert reasons["e"] == "ISUP grade '7' is not 0-5"


def test_csv_import(tmp_path):
    pd.DataFrame({"img": ["s1", "s2", "", "s1"], "patient": ["p1", "p1", "p2", "p1"], "y": ["A", "B", "A", "A"],
                  "file": ["x/s1.svs", "x/s2.svs", "x/s3.svs", "x/s1.svs"]}).to_csv(tmp_path / "c.csv", index=False)
    manifest, report = import_csv(tmp_path / "c.csv", slide_col="img", case_col="patient", path_col="file", label_col="y")
    assert list(manifest.columns[:4]) == ["slide_id", "case_id", "path", "label"]
    assert list(manifest["slide_id"]) == ["s1", "s2"]
    assert dict(report.dropped) == {"row 3": "empty img", "s1": "listed twice"}
    with pytest.raises(HistobenchError, match="missing column\\(s\\) nope"):
        import_csv(tmp_path / "c.csv", slide_col="nope", case_col="patient", path_col="file")


# --------------------------------------------------------------------------------------- manifest rows


def test_manifest_rows_survival_problems_are_per_slide():
    df = pd.DataFrame({
        "slide_id": ["s1", "s2", "s3", "s4", "s5", "s1", None, "s6"],
        "case_id": ["p1", "p2", "p3", "p4", "p5", "p1", "p6", None],
        "path": ["a"] * 8,
        "time": [10.0, float("nan"), -3.0, 0.0, 5.0, 10.0, 1.0, 2.0],
        "event": [1, 0, 1, 0, 2, 1, 0, 0],
    })
    good, problems = validate_manifest_rows(df, _Task("survival"))
    assert list(good["slide_id"]) == ["s1"] and good["time"].dtype == float and good["event"].tolist() == [1]
    reasons = dict(problems)
    assert "not a number" in reasons["s2"]
    assert reasons["s3"] == "survival time must be positive, got -3"
    assert reasons["s4"] == "survival time must be positive, got 0"
    assert "event must be 0" in reasons["s5"]
    assert "more than once" in reasons["s1"]
    assert reasons["row 7"] == "no slide_id" and reasons["s6"] == "no case_id"


def test_manifest_rows_labels_unknown_ids_and_missing_columns():
    df = pd.DataFrame({"slide_id": ["a", "b", "c", "d"], "case_id": ["1", "2", "3", "4"], "path": ["p"] * 4,
                       "label": [3.0, 7.0, None, 0.0]})
    good, problems = validate_manifest_rows(df, _Task("grading", tuple("012345")), known_slide_ids={"a", "b", "c"})
    assert good["label"].tolist() == ["3"]
    assert dict(problems) == {"b": "unknown label '7' (classes: 0, 1, 2, 3, 4, 5)", "c": "no label",
                              "d": "unknown slide_id (not in the task's label table)"}
    with pytest.raises(HistobenchError, match="missing column\\(s\\) time, event"):
        validate_manifest_rows(df, _Task("survival"))


# ------------------------------------------------------------------------------------------ status table


def test_status_table_appends_atomically_and_summarises(tmp_path):
    path = tmp_path / "run" / "status.csv"
    first = StatusTable()
    first.add("s1", "manifest", "ok")
    first.add("s2", "manifest", "skipped", "no case_id")
    first.save(path)
    first.save(path)  # saving twice writes each record once
    second = StatusTable()
    second.add("s1", "tile", "error", "corrupt or truncated slide:\n JPEG error")
    second.save(path)
    back = StatusTable.load(path)
    assert [(r.slide_id, r.stage, r.status) for r in back] == [("s1", "manifest", "ok"), ("s2", "manifest", "skipped"),
                                                               ("s1", "tile", "error")]
    assert back.records[2].reason == "corrupt or truncated slide: JPEG error"  # one line
    assert back.summary() == "status: 2 slides; ok 1, skipped 1 (manifest: 1), error 1 (tile: 1)"
    assert back.records[1].line() == "slide s2 (manifest): skipped: no case_id"
    assert not list(path.parent.glob(".*.tmp"))
    with pytest.raises(ValueError):
        first.add("s3", "tile", "weird")


# ----------------------------------------------------------------------------------------- bad slides


@pytest.fixture(scope="module")
def bad_slides(tmp_path_factory) -> dict[str, Path]:
    """Broken copies and look-alikes of real and synthetic slides, one per kind of bad input."""
    import tifffile

    from histobench.slides.synthetic import write_synthetic_slide, write_tiff_pyramid

    d = tmp_path_factory.mktemp("bad")
    out = {"missing": d / "nowhere.svs"}
    (d / "garbage.svs").write_bytes(b"this is not a slide" * 100)
    out["corrupt"] = d / "garbage.svs"
    good = d / "good.tiff"
    write_synthetic_slide(good, class_index=0, n_classes=2, seed=1, size=(768, 768), mpp=0.5, tile=128)
    out["good"] = good
    data = good.read_bytes()
    (d / "truncated.tiff").write_bytes(data[: len(data) // 3])
    out["truncated"] = d / "truncated.tiff"
    blank = np.full((768, 768, 3), 243, dtype=np.uint8)
    write_tiff_pyramid(d / "blank.tiff", blank, mpp=0.5, tile=128)
    out["no_tissue"] = d / "blank.tiff"
    rgb = np.asarray(tifffile.imread(good, level=0))
    with tifffile.TiffWriter(d / "nompp.tiff") as tw:  # no resolution tags at all
        tw.write(rgb, tile=(128, 128), photometric="rgb", compression="jpeg", metadata=None, software=False)
    out["no_mpp"] = d / "nompp.tiff"
    if REAL.is_dir():
        svs = REAL / "CMU-1-Small-Region.svs"
        raw = svs.read_bytes()
        (d / "cut.svs").write_bytes(raw[: int(len(raw) * 0.6)])
        out["truncated_svs"] = d / "cut.svs"
        out["svs"] = svs
        out["ndpi"] = REAL / "ndpi-fluorescence" / "test3-DAPI-2.ndpi"
        out["dicom"] = REAL / "CMU-1-Small-Region-dicom"
    return out


def test_check_slide_names_each_bad_input(bad_slides):
    b = bad_slides
    assert check_slide({"path": b["good"]}) is None
    assert check_slide({"path": b["missing"]}).startswith("missing file")
    assert check_slide({"path": None}) == "no path in the manifest"
    assert check_slide({"path": b["corrupt"]}).startswith("unreadable slide")
    assert check_slide({"path": b["truncated"]}) is not None
    assert check_slide({"path": b["no_mpp"]}).startswith("no resolution metadata")
    assert check_slide({"path": b["no_mpp"]}, mpp=0.5) is None  # --mpp rescues it
    assert check_slide({"path": b["no_tissue"]}) == "no tissue found on the thumbnail"


@needs_real
def test_check_slide_on_real_slides(bad_slides):
    b = bad_slides
    assert check_slide({"path": b["svs"]}) is None
    reason = check_slide({"path": b["truncated_svs"]})
    assert reason is not None and ("truncated" in reason or "unreadable" in reason)
    assert check_slide({"path": b["ndpi"]}) == "not a brightfield H&E slide (dark background: fluorescence)"
    assert check_slide({"path": b["ndpi"]}, brightfield_only=False) is None
    notes: list[str] = []
    assert check_slide({"path": b["dicom"]}, warnings=notes) is None
    assert notes and "YCbCr" in notes[0]


def test_cohort_check_cli_goes_on_and_records_everything(bad_slides, tmp_path):
    from typer.testing import CliRunner

    from histobench.cli.app import build_app

    b = bad_slides
    rows = [("good", "p1", b["good"]), ("gone", "p2", b["missing"]), ("junk", "p3", b["corrupt"]),
            ("blank", "p4", b["no_tissue"]), ("nompp", "p5", b["no_mpp"]), ("", "p6", b["good"])]
    pd.DataFrame(rows, columns=["slide_id", "case_id", "path"]).assign(label="A").to_csv(tmp_path / "m.csv", index=False)
    status = tmp_path / "status.csv"
    runner = CliRunner()
    root = ["--data-root", str(b["good"].parent)]  # the slides live outside the manifest's folder
    res = runner.invoke(build_app(), ["cohort", "check", str(tmp_path / "m.csv"), "--status", str(status), *root])
    assert res.exit_code == 0, res.output
    table = StatusTable.load(status)
    by_id = {r.slide_id: r for r in table}
    assert by_id["good"].status == "ok"
    assert by_id["gone"].reason.startswith("missing file") and by_id["junk"].status == "skipped"
    assert by_id["blank"].reason == "no tissue found on the thumbnail"
    assert by_id["nompp"].reason.startswith("no resolution metadata")
    assert by_id["row 6"].reason == "no slide_id"
    # --fail-fast stops at the first problem, keeps what was recorded before it, exit code 2
    res = runner.invoke(build_app(), ["cohort", "check", str(tmp_path / "m.csv"), "--status", str(status), "--fail-fast",
                                      *root])
    assert res.exit_code == 2
    assert len(StatusTable.load(status)) == len(table) + 1


def test_import_gdc_cli(tmp_path):
    from typer.testing import CliRunner

    from histobench.cli.app import build_app

    sheet = sample_sheet_from_table(pd.DataFrame({"slide_id": ["TCGA-AA-0001-01Z-00-DX1.a", "TCGA-AA-0002-01A-01-TS1.b"],
                                                  "oncotree_code": ["LUAD", "LUSC"]}))
    sheet.to_csv(tmp_path / "s.tsv", sep="\t", index=False)
    res = CliRunner().invoke(build_app(), ["cohort", "import-gdc", "--sample-sheet", str(tmp_path / "s.tsv"),
                                           "--out", str(tmp_path / "m.csv")])
    assert res.exit_code == 0, res.output
    assert "kept 1 slides of 1 patients (LUAD 1)" in res.output and "not a diagnostic (DX) slide" in res.output
    assert len(pd.read_csv(tmp_path / "m.csv")) == 1
    assert len(pd.read_csv(tmp_path / "m-dropped.csv")) == 1


def test_manifest_rows_known_ids_from_the_task_and_demo_bypass():
    from histobench.registry import create

    task = create("task", "tcga-nsclc")
    df = pd.DataFrame({"slide_id": ["DEMO-0001-01"], "case_id": ["DEMO-0001"], "path": ["x"], "label": ["LUAD"]})
    _, problems = validate_manifest_rows(df, task)
    assert problems == [("DEMO-0001-01", "unknown slide_id (not in the task's label table)")]
    good, problems = validate_manifest_rows(df, task, check_known_ids=False)
    assert problems == [] and len(good) == 1
