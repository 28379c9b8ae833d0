"""Every bad input, each a test (issue 14, part 4): slides, manifests, options, plugins, training, feature files.

Each case ends in one of two ways, and the test says which:

- a one-line error naming the culprit (file, slide id, column, option, plugin): through the CLI exit code 2, one
  ``error:`` line on stderr and no traceback;
- a recorded skip in the status table (``status.csv``) naming the slide and the reason, which ``--fail-fast``
  turns into that one-line error.

Either way nothing already written is lost: the tests snapshot what existed before (demo slides, tiles,
features, checkpoints) and compare it after. Library functions are used where the CLI path is covered once per
group; the CLI tests share one small demo work folder (4 patients, 1024 px slides).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from histobench import hookimpl
from histobench.cli.app import build_app
from histobench.cohorts.manifest import check_paths, load_manifest, validate_manifest
from histobench.cohorts.status import StatusTable, check_cohort_labels, check_slide, validate_manifest_rows
from histobench.components import Aggregator, Encoder
from histobench.errors import HistobenchError
from histobench.registry import ComponentBuildError, create

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REAL = Path(__file__).parent / "data" / "slides"
SVS = REAL / "CMU-1-Small-Region.svs"
NDPI = REAL / "ndpi-fluorescence" / "test3-DAPI-2.ndpi"
DEMO = ["--task", "tcga-nsclc", "--demo", "-o", "task.demo_patients=4", "-o", "task.demo_slide_px=1024"]
# a few DINO steps on 8 tiles, a checkpoint after every step
PRETRAIN = ["-o", "train.epochs=1", "-o", "train.batch_size=8", "-o", "train.steps_per_epoch=3",
            "-o", "train.checkpoint_every=1", "-o", "pretext.out_dim=256", "-o", "pretext.n_local_crops=2"]
runner = CliRunner()


def cli(*args: str):
    return runner.invoke(build_app(), [str(a) for a in args], env={"COLUMNS": "400"})


def one_line_error(result, *needles: str) -> str:
    """Exit code 2, no traceback, exactly one ``error:`` line on stderr and it is the last; returns it."""
    out = result.stderr
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], out
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def snapshot(root: Path, *parts: str) -> dict[str, str]:
    """sha256 of every file under ``root/part`` for each part: what must survive a failure unchanged."""
    out = {}
    for part in parts:
        for p in sorted((root / part).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_kept(before: dict[str, str], root: Path, *parts: str) -> None:
    after = snapshot(root, *parts)
    lost = {k for k in before if k not in after}
    changed = {k for k in before if k in after and after[k] != before[k]}
    assert not lost and not changed, f"lost {sorted(lost)}, changed {sorted(changed)}"


@pytest.fixture(scope="module")
def demo_work(tmp_path_factory) -> Path:
    """A work folder with the small demo cohort, its tiles and timm features (one ``extract``)."""
    work = tmp_path_factory.mktemp("bad-inputs") / "work"
    res = cli("extract", *DEMO, "--workdir", work)
    assert res.exit_code == 0, res.output
    assert len(list(work.glob("features/*/*.h5"))) == 5
    return work


@pytest.fixture
def work(demo_work, tmp_path) -> Path:
    """A private copy of the demo work folder, for a test that breaks something in it."""
    dst = tmp_path / "work"
    shutil.copytree(demo_work, dst)
    return dst


def features_dir(work: Path) -> Path:
    (folder,) = work.glob("features/*")
    return folder


# ================================================================================================= slides


@pytest.fixture(scope="module")
def bad_slides(tmp_path_factory) -> dict[str, Path]:
    """One file per kind of bad slide, next to one good synthetic slide."""
    import tifffile
    from PIL import Image

    from histobench.slides.synthetic import write_synthetic_slide, write_tiff_pyramid

    d = tmp_path_factory.mktemp("slides")
    good = d / "good.tiff"
    write_synthetic_slide(good, class_index=0, n_classes=2, seed=3, size=(768, 768), mpp=0.5, tile=128)
    (d / "zero.svs").write_bytes(b"")
    (d / "notes.svs").write_text("slide_id,case_id\nthis is a text file renamed .svs\n" * 20)
    buf = d / "photo.png"
    Image.fromarray(np.full((256, 256, 3), 200, np.uint8)).save(buf)
    shutil.copy(buf, d / "photo.svs")
    if SVS.exists():
        raw = SVS.read_bytes()
        (d / "cut.svs").write_bytes(raw[: len(raw) // 2])  # a real Aperio SVS cut in half
    else:  # pragma: no cover - the test data ship with the repository
        raw = good.read_bytes()
        (d / "cut.svs").write_bytes(raw[: len(raw) // 2])
    rgb = np.asarray(tifffile.imread(good, level=0))
    with tifffile.TiffWriter(d / "nompp.tiff") as tw:  # no resolution tags at all
        tw.write(rgb, tile=(128, 128), photometric="rgb", compression="jpeg", metadata=None, software=False)
    write_tiff_pyramid(d / "blank.tiff", np.full((768, 768, 3), 242, np.uint8), mpp=0.5, tile=128)
    dark = np.full((768, 768, 3), 6, np.uint8)  # a fluorescence-like scan: black, with a few bright nuclei
    yy, xx = np.mgrid[:768, :768]
    for cy, cx in np.random.default_rng(0).integers(100, 668, size=(60, 2)):
        dark[(yy - cy) ** 2 + (xx - cx) ** 2 < 49] = (30, 60, 220)
    write_tiff_pyramid(d / "dark.tiff", dark, mpp=0.5, tile=128)
    names = {"good": "good.tiff", "zero": "zero.svs", "text": "notes.svs", "png": "photo.png",
             "png_as_svs": "photo.svs", "truncated": "cut.svs", "no_mpp": "nompp.tiff", "no_tissue": "blank.tiff",
             "fluorescence": "dark.tiff"}
    out = {k: d / v for k, v in names.items()}
    out["missing"] = d / "gone.svs"
    return out


@pytest.mark.parametrize("kind,reason", [
    ("missing", "missing file"),
    ("zero", "unreadable slide: empty file (0 bytes)"),
    ("text", "unsupported or corrupt file format (.svs file holding text)"),
    ("png", "unsupported or corrupt file format (.png file holding a PNG image)"),
    ("png_as_svs", "unsupported or corrupt file format (.svs file holding a PNG image)"),
    ("truncated", "truncated"),
    ("no_mpp", "no resolution metadata (µm/px); pass --mpp to set it"),
    ("no_tissue", "no tissue found on the thumbnail"),
    ("fluorescence", "not a brightfield H&E slide (dark background: fluorescence)"),
])
def test_each_bad_slide_has_its_reason(bad_slides, kind, reason):
    assert check_slide({"path": bad_slides["good"]}) is None
    got = check_slide({"path": bad_slides[kind]})
    assert got is not None and reason in got, got
    assert "\n" not in got


def test_no_mpp_is_rescued_by_an_explicit_pixel_size(bad_slides):
    assert check_slide({"path": bad_slides["no_mpp"]}, mpp=0.5) is None


@pytest.mark.skipif(not NDPI.exists(), reason="real NDPI test slide not present")
def test_real_fluorescence_ndpi_is_refused_as_not_brightfield():
    assert check_slide({"path": NDPI}) == "not a brightfield H&E slide (dark background: fluorescence)"


def test_cohort_check_records_every_bad_slide_and_fail_fast_stops_keeping_the_records(bad_slides, tmp_path):
    rows = [(f"s-{k}", f"p-{k}", str(p)) for k, p in bad_slides.items()]
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows, columns=["slide_id", "case_id", "path"]).to_csv(manifest, index=False)
    status = tmp_path / "status.csv"
    root = bad_slides["good"].parent
    res = cli("cohort", "check", manifest, "--status", status, "--data-root", root)
    assert res.exit_code == 0, res.output
    table = {r.slide_id: r for r in StatusTable.load(status)}
    assert table["s-good"].status == "ok"
    assert {sid for sid, r in table.items() if r.status == "skipped"} == {f"s-{k}" for k in bad_slides} - {"s-good"}
    assert table["s-zero"].reason == "unreadable slide: empty file (0 bytes)"
    assert "fluorescence" in table["s-fluorescence"].reason
    first = status.read_text()
    res = cli("cohort", "check", manifest, "--status", status, "--data-root", root, "--fail-fast")
    line = one_line_error(res, "slide s-", "(check): skipped")
    assert status.read_text().startswith(first)  # earlier records kept, the new ones appended
    assert len(StatusTable.load(status)) > len(table)
    assert line.split("slide ", 1)[1].split(" ", 1)[0] in {f"s-{k}" for k in bad_slides}


def test_a_run_skips_broken_demo_slides_in_the_status_table_and_fail_fast_stops(work):
    """Cut one slide of the cached demo cohort in half and empty another: extraction skips both, recording
    why in status.csv; with --fail-fast the first is a one-line error. Every tile and feature file survives."""
    slides = work / "demo" / "tcga-nsclc" / "slides"
    cut, empty = slides / "DEMO-0002-01.tiff", slides / "DEMO-0003-01.tiff"
    raw = cut.read_bytes()
    cut.write_bytes(raw[: len(raw) // 2])
    empty.write_bytes(b"")
    before = snapshot(work, "tiles", "features")
    status = work / "status.csv"
    old_status = status.read_text()

    line = one_line_error(cli("extract", *DEMO, "--workdir", work, "--fail-fast"), "slide DEMO-0002-01 (tile)",
                          "--fail-fast")
    assert "truncated" in line or "unsupported or corrupt" in line
    assert_kept(before, work, "tiles", "features")

    res = cli("extract", *DEMO, "--workdir", work)
    assert res.exit_code == 0, res.output
    assert "3 slides" in res.stdout or "cached" in res.stdout
    assert status.read_text().startswith(old_status)
    recs = [r for r in StatusTable.load(status) if r.status == "skipped"]
    reasons = {r.slide_id: r.reason for r in recs}
    assert set(reasons) == {"DEMO-0002-01", "DEMO-0003-01"}
    assert reasons["DEMO-0003-01"] == "unreadable slide: empty file (0 bytes)"
    assert_kept(before, work, "tiles", "features")


# ============================================================================================== manifests


def _frame(rows, columns=("slide_id", "case_id", "path", "label")):
    return pd.DataFrame(rows, columns=list(columns))


@pytest.fixture(scope="module")
def nsclc():
    return create("task", "tcga-nsclc")


def test_unknown_slide_ids_are_recorded_per_slide(nsclc):
    known = nsclc.labels().iloc[0]
    df = _frame([(known.slide_id, known.case_id, "a.svs", known.label), ("TCGA-ZZ-9999-01Z-00-DX1.x", "TCGA-ZZ-9999",
                                                                           "b.svs", "LUAD")])
    good, problems = validate_manifest_rows(df, nsclc)
    assert list(good["slide_id"]) == [known.slide_id]
    assert problems == [("TCGA-ZZ-9999-01Z-00-DX1.x", "unknown slide_id (not in the task's label table)")]


def test_missing_columns_name_the_column_and_the_file(tmp_path, nsclc):
    m = tmp_path / "cohort.csv"
    _frame([("s1", "p1", "LUAD")], ("slide_id", "case_id", "label")).to_csv(m, index=False)
    with pytest.raises(HistobenchError, match=r"manifest .*cohort\.csv is missing column\(s\) path"):
        load_manifest(m)
    df = _frame([("s1", "p1", "a.svs")], ("slide_id", "case_id", "path"))
    with pytest.raises(HistobenchError, match=r"^manifest m\.csv is missing column\(s\) label for task tcga-nsclc"):
        validate_manifest_rows(df, nsclc, source="manifest m.csv")


def test_duplicated_slide_ids_refuse_a_manifest_file_and_are_dropped_row_by_row(tmp_path):
    rows = [("s1", "p1", "a.svs", "LUAD"), ("s1", "p2", "b.svs", "LUSC")]
    with pytest.raises(HistobenchError, match=r"manifest x\.csv lists slide 's1' more than once"):
        validate_manifest(_frame(rows), source="manifest x.csv")
    _, problems = validate_manifest_rows(_frame(rows), None)
    assert problems == [("s1", "slide_id listed more than once (later row dropped)")]


def test_a_patient_with_two_labels_loses_all_its_slides(nsclc):
    df = _frame([("s1", "p1", "a", "LUAD"), ("s2", "p1", "b", "LUSC"), ("s3", "p2", "c", "LUAD"),
                 ("s4", "p3", "d", "LUSC")])
    good, problems = validate_manifest_rows(df, nsclc, check_known_ids=False)
    assert list(good["slide_id"]) == ["s3", "s4"]
    assert [p[0] for p in problems] == ["s1", "s2"]
    assert problems[0][1] == "patient p1 has conflicting labels ('LUAD' on s1; 'LUSC' on s2); all its slides dropped"


def test_survival_times_nan_negative_and_conflicting():
    task = create("task", "tcga-luad-survival")
    df = pd.DataFrame({"slide_id": ["a", "b", "c", "d", "e", "f"], "case_id": ["p1", "p2", "p3", "p4", "p5", "p5"],
                       "path": list("abcdef"), "time": [12.0, float("nan"), -3.0, 0.0, 5.0, 7.0],
                       "event": [1, 0, 1, 1, 0, 0]})
    good, problems = validate_manifest_rows(df, task, check_known_ids=False)
    assert list(good["slide_id"]) == ["a"]
    reasons = dict(problems)
    assert reasons["b"].startswith("survival time is missing or not a number")
    assert reasons["c"] == "survival time must be positive, got -3"
    assert reasons["d"] == "survival time must be positive, got 0"
    assert "patient p5 has conflicting survival outcomes" in reasons["e"] and reasons["f"] == reasons["e"]


def test_single_class_empty_and_eventless_cohorts_are_refused(nsclc):
    one = _frame([(f"s{i}", f"p{i}", "x", "LUAD") for i in range(6)])
    with pytest.raises(HistobenchError, match=r"has a single class \('LUAD', 6 patients\); task tcga-nsclc needs"):
        check_cohort_labels(one, nsclc)
    with pytest.raises(HistobenchError, match="is empty after filtering"):
        check_cohort_labels(one.iloc[:0], nsclc)
    surv = create("task", "tcga-luad-survival")
    censored = pd.DataFrame({"slide_id": ["a", "b"], "case_id": ["p1", "p2"], "time": [3.0, 4.0], "event": [0, 0]})
    with pytest.raises(HistobenchError, match=r"no death \(event 1\)"):
        check_cohort_labels(censored, surv)
    check_cohort_labels(_frame([("a", "p1", "x", "LUAD"), ("b", "p2", "x", "LUSC")]), nsclc)  # two classes: fine


def test_manifest_paths_cannot_escape_the_data_root(tmp_path):
    root = tmp_path / "root"
    (root / "slides").mkdir(parents=True)
    (root / "slides" / "ok.svs").write_bytes(b"x")
    outside = tmp_path / "elsewhere.svs"
    outside.write_bytes(b"x")
    (root / "slides" / "link.svs").symlink_to(outside)
    m = root / "m.csv"

    def write(path):
        _frame([("s1", "p1", "slides/ok.svs", "LUAD"), ("s2", "p2", path, "LUSC")]).to_csv(m, index=False)

    write("slides/../slides/ok.svs")  # '..' that stays inside is fine
    assert len(load_manifest(m)) == 2
    for bad in ("../../etc/passwd", "slides/link.svs", str(outside)):
        write(bad)
        with pytest.raises(HistobenchError, match=r"slide s2 has path .* outside the data root .*--allow-outside-data-root"):
            load_manifest(m)
        assert len(load_manifest(m, allow_outside=True)) == 2
    write(str(outside))  # an absolute path inside another named data root is fine
    assert len(load_manifest(m, data_root=tmp_path)) == 2
    df = _frame([("s9", "p9", "/etc/passwd", "LUAD")])
    with pytest.raises(HistobenchError, match=r"^the cohort: slide s9 has path '/etc/passwd'"):
        check_paths(df, [root], source="the cohort")


def test_cli_manifest_errors_are_one_line(tmp_path):
    m = tmp_path / "m.csv"
    _frame([("s1", "p1", "../../etc/passwd", "LUAD")]).to_csv(m, index=False)
    one_line_error(cli("cohort", "check", m, "--status", tmp_path / "st.csv"), f"manifest {m}: slide s1 has path",
                   "outside the data root")
    _frame([("s1", "p1", "a.svs")], ("slide_id", "case_id", "path")).to_csv(m, index=False)
    one_line_error(cli("cohort", "check", m, "--task", "tcga-nsclc", "--status", tmp_path / "st.csv"),
                   f"manifest {m} is missing column(s) label for task tcga-nsclc")
    m.write_bytes(b"\x00\x01 not,a\ncsv\"\"\" at all\n\x00")
    res = cli("cohort", "check", m, "--status", tmp_path / "st.csv")
    assert res.exit_code in (0, 2) and "Traceback" not in res.output  # unreadable or without columns: no crash
    if res.exit_code == 2:
        one_line_error(res, f"manifest {m}")


def _edit_demo_manifest(work: Path, edit) -> None:
    path = work / "demo" / "tcga-nsclc" / "manifest.csv"
    df = pd.read_csv(path, dtype=str)
    edit(df).to_csv(path, index=False)


@pytest.mark.parametrize("case,needle", [
    ("duplicate", "lists slide 'DEMO-0001-01' more than once"),
    ("single_class", "has a single class ('LUAD', 4 patients)"),
    ("empty", "no usable slide in the cohort of task tcga-nsclc"),
    ("no_label_column", "is missing column(s) label"),
])
def test_cli_bad_demo_manifest_is_one_line_and_loses_nothing(work, case, needle):
    edits = {
        "duplicate": lambda df: pd.concat([df, df.iloc[:1]]),
        "single_class": lambda df: df.assign(label="LUAD"),
        "empty": lambda df: df.assign(label="MESO"),
        "no_label_column": lambda df: df.drop(columns="label"),
    }
    _edit_demo_manifest(work, edits[case])
    before = snapshot(work, "demo", "tiles", "features")
    res = cli("evaluate", *DEMO, "--workdir", work, "--features", features_dir(work), "--no-track")
    one_line_error(res, needle)
    assert_kept(before, work, "demo", "tiles", "features")


def test_cli_bad_manifest_rows_are_recorded_skips_and_fail_fast_makes_them_errors(work):
    """Row-level problems (an unknown label, a patient with two labels) skip the rows in status.csv and the run
    goes on with the rest; with --fail-fast the first one is the one-line error."""
    def edit(df):
        df = df.copy()
        df.loc[df["slide_id"] == "DEMO-0001-01", "label"] = "MESO"
        two = df[df["case_id"] == "DEMO-0004"].index  # DEMO-0004 has two slides: give them different labels
        df.loc[two[0], "label"], df.loc[two[1], "label"] = "LUAD", "LUSC"
        return df

    _edit_demo_manifest(work, edit)
    before = snapshot(work, "demo", "tiles", "features")
    status = work / "status.csv"
    old_status = status.read_text()
    one_line_error(cli("extract", *DEMO, "--workdir", work, "--fail-fast"),
                   "slide DEMO-0001-01 (manifest): unknown label 'MESO' (classes: LUAD, LUSC) (--fail-fast)")
    res = cli("extract", *DEMO, "--workdir", work)
    assert res.exit_code == 0, res.output
    assert status.read_text().startswith(old_status)
    skipped = {r.slide_id: r.reason for r in StatusTable.load(status) if r.status == "skipped"}
    assert set(skipped) == {"DEMO-0001-01", "DEMO-0004-01", "DEMO-0004-02"}
    assert skipped["DEMO-0004-01"].startswith("patient DEMO-0004 has conflicting labels ('LUAD' on DEMO-0004-01; "
                                              "'LUSC' on DEMO-0004-02)")
    assert_kept(before, work, "demo", "tiles", "features")


def test_cli_data_root_cohort_with_a_symlink_out_is_refused_unless_allowed(work, tmp_path, nsclc):
    """A real task's cohort under --data-root: a slide file that is a symlink out of the root is refused."""
    root = tmp_path / "root"
    root.mkdir()
    sid = nsclc.labels().iloc[0].slide_id
    (root / f"{sid}.svs").symlink_to(work / "demo" / "tcga-nsclc" / "slides" / "DEMO-0001-01.tiff")
    args = ["evaluate", "--task", "tcga-nsclc", "--data-root", root, "--workdir", work, "--features",
            features_dir(work), "--no-track"]
    one_line_error(cli(*args), f"the cohort of task tcga-nsclc: slide {sid} has path", "outside the data root",
                   "--allow-outside-data-root")
    line = one_line_error(cli(*args, "--allow-outside-data-root"))  # past the path check: one slide, one class
    assert "outside the data root" not in line and "single class" in line


# ================================================================================================ options


@pytest.mark.parametrize("args,needles", [
    (["-o", "pretext.out_dimm=8"], ["option pretext.out_dimm: pretext 'dino' has no option 'out_dimm'.",
                                    "Did you mean 'out_dim'?"]),
    (["-o", "train.epoch=2"], ["option train.epoch", "Did you mean 'epochs'?"]),
    (["-o", "eval.epoch=2"], ["option eval.epoch", "Did you mean 'epochs'?"]),
    (["-o", "pretxt.out_dim=8"], ["must start with one of", "Did you mean 'pretext.out_dim'?"]),
    (["-o", "train.epochs=zero"], ["option train.epochs='zero'", "valid integer"]),
    (["-o", "train.epochs=0"], ["option train.epochs=0", "greater than or equal to 1"]),
    (["-o", "task.folds=1"], ["option task.folds=1", "greater than or equal to 2"]),
    (["-o", "task.min_tissue=1.5"], ["option task.min_tissue=1.5", "less than or equal to 1"]),
    (["-o", "train.batch_size"], ["is not of the form prefix.key=value"]),
])
def test_cli_bad_options_are_one_line_before_any_work(tmp_path, args, needles):
    work = tmp_path / "work"
    one_line_error(cli("pretrain", "--pretext", "dino", *DEMO, "--workdir", work, *args), *needles)
    assert not work.exists() or not any(work.rglob("*.tiff"))  # nothing was made


# ================================================================================================ plugins


class ExplodingEncoder(Encoder):
    """An encoder whose build raises."""

    name = "exploding-enc"

    def build(self):
        raise ValueError("weights file /models/x.pt has the wrong shape\nsecond line")


class CrashingAggregator(Aggregator):
    """An aggregator whose constructor raises."""

    name = "crashing-agg"

    def __init__(self, options=None, **kw):
        super().__init__(options, **kw)
        raise KeyError("missing_setting")


class Exploding:
    @hookimpl
    def register_encoders(self, register):
        register(ExplodingEncoder)

    @hookimpl
    def register_aggregators(self, register):
        register(CrashingAggregator)


@pytest.mark.parametrize("args,needle", [
    (["pretrain", "--pretext", "dinno"], "unknown pretext 'dinno'. Did you mean 'dino'?"),
    (["extract", "--encoder", "timmm"], "unknown encoder 'timmm'. Did you mean 'timm'?"),
])
def test_cli_unknown_component_suggests_the_closest(tmp_path, args, needle):
    one_line_error(cli(*args, *DEMO, "--workdir", tmp_path / "w"), needle)


def test_cli_unknown_task_suggests_the_closest(tmp_path):
    one_line_error(cli("extract", "--task", "tcga-nsclcc", "--demo", "--workdir", tmp_path / "w"),
                   "unknown task 'tcga-nsclcc'. Did you mean 'tcga-nsclc'?")


def test_cli_component_that_raises_on_build_names_its_plugin(register_plugin, tmp_path):
    register_plugin(Exploding(), "exploding")
    line = one_line_error(cli("extract", *DEMO, "--encoder", "exploding-enc", "--workdir", tmp_path / "w"),
                          "encoder 'exploding-enc' of plugin 'exploding' failed to build: ValueError: weights file")
    assert "second line" in line  # the plugin's message, joined onto the one line
    with pytest.raises(ComponentBuildError, match="aggregator 'crashing-agg' of plugin 'exploding' failed to build: "
                                                  "KeyError: 'missing_setting'"):
        create("aggregator", "crashing-agg")


def test_component_errors_that_are_already_one_line_pass_through(register_plugin):
    class Polite(ExplodingEncoder):
        name = "polite-enc"

        def build(self):
            raise HistobenchError("encoder polite-enc needs --weights")

    class Plugin:
        @hookimpl
        def register_encoders(self, register):
            register(Polite)

    register_plugin(Plugin(), "polite")
    with pytest.raises(HistobenchError, match="^encoder polite-enc needs --weights$") as info:
        create("encoder", "polite-enc").build()
    assert not isinstance(info.value, ComponentBuildError)


@pytest.fixture
def broken_distribution(tmp_path) -> dict[str, str]:
    """A throwaway installed distribution whose histobench entry point raises on import."""
    site = tmp_path / "site"
    info = site / "brokenplug-0.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenplug\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[histobench]\nbroken = brokenplug_hooks\n")
    (site / "brokenplug_hooks.py").write_text("raise RuntimeError('cannot find libfoo.so\\nsee the docs')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               HISTOBENCH_LOAD_PLUGINS="broken", COLUMNS="400")
    return env


def test_cli_plugin_that_raises_on_import_is_named(broken_distribution):
    res = subprocess.run([sys.executable, "-m", "histobench", "tasks", "list"], env=broken_distribution,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("error: plugin 'broken' (brokenplug_hooks, from brokenplug 0.3) failed to import: "
                               "RuntimeError: cannot find libfoo.so see the docs"), lines[0]
    env = dict(broken_distribution, HISTOBENCH_DISABLE_PLUGINS="broken")
    ok = subprocess.run([sys.executable, "-m", "histobench", "tasks", "list"], env=env, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr  # the way out the error names works


# =============================================================================================== training


def _dino():
    from histobench_dino.pretext import DINO

    return DINO


def _register_pretext(register_plugin, cls, plugin_name):
    class Plugin:
        @hookimpl
        def register_pretexts(self, register):
            register(cls)

    register_plugin(Plugin(), plugin_name)


def test_cli_non_finite_loss_stops_naming_step_and_pretext_and_keeps_the_last_checkpoint(work, register_plugin):
    import torch

    class NaNDINO(_dino()):
        """DINO whose loss turns NaN at step index 2."""

        name = "nan-dino"

        def training_step(self, batch, step):
            out = super().training_step(batch, step)
            if step >= 2:
                out["loss"] = out["loss"] * float("nan")
            return out

    _register_pretext(register_plugin, NaNDINO, "nan")
    before = snapshot(work, "demo", "tiles", "features")
    res = cli("pretrain", "--pretext", "nan-dino", *DEMO, "--workdir", work, *PRETRAIN)
    (ckpt,) = work.glob("pretrain/nan-dino-*/checkpoint.pt")
    one_line_error(res, "non-finite loss (nan) at step 2 (epoch 0) of pretext 'nan-dino'",
                   f"the last good checkpoint is kept at {ckpt}", "try a lower train.lr")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["step"] == 2 and len(state["history"]) == 2
    assert all(np.isfinite(h["loss"]) for h in state["history"])
    assert not (ckpt.parent / "encoder.pt").exists()
    assert_kept(before, work, "demo", "tiles", "features")


@pytest.mark.parametrize("where,method", [("forward pass", "training_step"), ("optimizer step", "after_optimizer_step")])
def test_cli_cuda_out_of_memory_is_one_line_with_the_batch_size_to_use(work, register_plugin, where, method):
    import torch

    def oom(self, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    OOMDINO = type("OOMDINO", (_dino(),), {"name": f"oom-dino-{method.replace('_', '-')}", method: oom,
                                             "__doc__": "DINO that runs out of CUDA memory."})
    _register_pretext(register_plugin, OOMDINO, "oom")
    before = snapshot(work, "demo", "tiles", "features")
    res = cli("pretrain", "--pretext", OOMDINO.name, *DEMO, "--workdir", work, *PRETRAIN)
    one_line_error(res, f"CUDA ran out of memory in the {where} at train.batch_size=8; lower it, "
                        "e.g. -o train.batch_size=4")
    assert_kept(before, work, "demo", "tiles", "features")


def test_checkpoint_write_failure_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Library level: the second checkpoint write fails (a full disk); the first stays, no temporary file."""
    import errno

    import torch

    from histobench.pretrain import trainer
    from histobench.pretrain.data import SyntheticTileDataset

    pre = create("pretext", "dino", {"out_dim": 64, "hidden_dim": 16, "bottleneck_dim": 8, "n_local_crops": 2,
                                     "global_crop_size": 32, "local_crop_size": 16}, preset="demo")
    enc = create("encoder", "timm", {"img_size": 32, "model_kwargs": {"patch_size": 8, "embed_dim": 16, "depth": 1,
                                                                     "num_heads": 2}}, preset="demo")
    opts = type(pre).train_options("demo", epochs=1, batch_size=4, num_workers=0, steps_per_epoch=3, warmup_epochs=0,
                                   checkpoint_every=1)
    real = trainer._save_atomic
    calls = []

    def full_disk(obj, path):
        calls.append(obj["step"])
        if len(calls) == 2:
            path.with_name(path.name + ".tmp").write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(trainer, "_save_atomic", full_disk)
    with pytest.raises(HistobenchError) as info:
        trainer.pretrain(pre, enc, SyntheticTileDataset(12, 32, seed=0), opts, out_dir=tmp_path, device="cpu")
    ckpt = tmp_path / trainer.CHECKPOINT
    assert str(info.value) == (f"cannot write checkpoint {ckpt}: No space left on device (the disk is full or a "
                               f"file-size limit was reached); the checkpoint of step 1 is kept")
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [trainer.CHECKPOINT]  # the half-written file is gone


def _limit_file_size(limit: int):
    def apply():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_cli_full_disk_during_pretraining_names_the_checkpoint_and_loses_nothing(work):
    """A real file-size limit (RLIMIT_FSIZE, 4 MiB) in a subprocess: the slides, tiles and features of the
    work folder are smaller and stay as they were; the DINO checkpoint (about 10 MB) cannot be written."""
    before = snapshot(work, "demo", "tiles", "features")
    status_before = (work / "status.csv").read_text()
    cmd = [sys.executable, "-m", "histobench", "pretrain", "--pretext", "dino", *DEMO, "--workdir", str(work),
           *PRETRAIN]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(4 << 20),
                         env=dict(os.environ, COLUMNS="400"))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    (ckpt_dir,) = work.glob("pretrain/dino-*")
    ckpt = ckpt_dir / "checkpoint.pt"
    assert lines[-1].startswith(f"error: cannot write checkpoint {ckpt}: "), lines[-1]
    assert "no checkpoint was written before" in lines[-1]
    assert sum(ln.startswith("error:") for ln in lines) == 1
    assert not ckpt.exists() and not list(ckpt_dir.glob("*.tmp"))
    assert_kept(before, work, "demo", "tiles", "features")
    assert (work / "status.csv").read_text().startswith(status_before)


def test_cli_full_disk_in_any_stage_is_one_line_naming_the_file(work, monkeypatch):
    """Outside the checkpoint too: a tile file that cannot be written (EFBIG) stops the command in one line
    naming it, and the files written before stay."""
    import errno

    from histobench.slides import tiling

    shutil.rmtree(work / "tiles")  # the tiles are made again, and their first write fails
    before = snapshot(work, "demo", "features")

    def full(self, path, *a, **k):
        raise OSError(errno.EFBIG, "File too large", str(path))

    monkeypatch.setattr(tiling.TileSet, "save", full)
    line = one_line_error(cli("extract", *DEMO, "--workdir", work), "error: cannot write ",
                          "DEMO-0001-01.npz: File too large (the disk is full or a file-size limit was reached)")
    assert str(work / "tiles") in line
    assert_kept(before, work, "demo", "features")


_FEATURES_UNDER_A_LIMIT = """
import resource, signal, sys
from pathlib import Path
import numpy as np
from histobench.errors import HistobenchError
from histobench.features.cache import FeatureWriter
out = Path(sys.argv[1])
first = FeatureWriter(out / "first.h5", np.zeros((4, 2), np.int64), {"tag": "x"}, dim=8)  # written before
first.append(np.ones((4, 8), np.float32))
first.close()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
try:
    writer = FeatureWriter(out / "big.h5", np.zeros((4096, 2), np.int64), {"tag": "x"})
    for start in range(0, 4096, 512):
        writer.append(np.ones((512, 64), np.float32))
    writer.close()
except HistobenchError as err:
    print("ERROR", err)
"""


def test_a_full_disk_while_writing_a_feature_file_is_one_line_and_leaves_no_temporary_file(tmp_path):
    """A real file-size limit (64 KiB) under the HDF5 writer: the file is refused before its rows are written
    (HDF5 cannot close a file whose write failed for want of space without crashing the process), in one error
    naming the feature file and the limit; no .tmp is left, and the file written before is intact."""
    res = subprocess.run([sys.executable, "-c", _FEATURES_UNDER_A_LIMIT, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("ERROR")]
    assert line == (f"ERROR cannot write feature file {tmp_path / 'big.h5'}: it needs about 1.1 MiB and this process "
                    f"may write files of at most 65536 bytes (ulimit -f); the slides written before it are kept")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.h5"]
    with h5py.File(tmp_path / "first.h5") as f:
        assert f["features"].shape == (4, 8) and f.attrs["tag"] == "x"


def test_disk_full_reason_reads_the_three_forms_a_full_disk_takes():
    import errno

    from histobench.errors import disk_full_reason

    assert disk_full_reason(OSError(errno.ENOSPC, "No space left on device")).startswith("No space left on device")
    assert disk_full_reason(RuntimeError("Can't decrement id ref count (unable to extend file properly, errno = 27, "
                                         "error message = 'File too large')")).startswith("File too large")
    assert "stopped short" in disk_full_reason(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos"))
    assert disk_full_reason(OSError(errno.EACCES, "Permission denied")) is None
    assert disk_full_reason(RuntimeError("errno = 13")) is None
    assert disk_full_reason(ValueError("errno = 28")) is None


# ========================================================================================== feature files


def _h5(path: Path, **datasets) -> Path:
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            f.create_dataset(name, data=data)
    return path


def test_feature_files_from_another_tool_name_the_file_and_the_problem(tmp_path):
    from histobench.features.cache import read_features

    f = np.zeros((5, 8), np.float32)
    xy = np.zeros((5, 2), np.int64)
    wrong = _h5(tmp_path / "wrong.h5", feats=f, coords=xy)
    with pytest.raises(HistobenchError, match=r"feature file .*wrong\.h5 has no 'features' dataset \(has: coords, "
                                              r"feats\); expected 'features' \[N, D\] and 'coords' \[N, 2\]"):
        read_features(wrong)
    flat = _h5(tmp_path / "flat.h5", features=np.zeros(40, np.float32))
    with pytest.raises(HistobenchError, match=r"flat\.h5: 'features' has shape \[40\], expected \[N, D\]"):
        read_features(flat)
    cube = _h5(tmp_path / "cube.h5", features=np.zeros((2, 5, 8), np.float32))
    with pytest.raises(HistobenchError, match=r"cube\.h5: 'features' has shape \[2, 5, 8\]"):
        read_features(cube)
    short = _h5(tmp_path / "short.h5", features=f, coords=xy[:3])
    with pytest.raises(HistobenchError, match=r"short\.h5: 'coords' has shape \[3, 2\], expected \[5, 2\]"):
        read_features(short)
    text = _h5(tmp_path / "text.h5", features=np.array([b"a", b"b"]))
    with pytest.raises(HistobenchError, match=r"text\.h5"):
        read_features(text)
    junk = tmp_path / "junk.h5"
    junk.write_text("not an HDF5 file")
    with pytest.raises(HistobenchError, match=r"cannot read feature file .*junk\.h5"):
        read_features(junk)
    trident = _h5(tmp_path / "trident.h5", features=f[None], coords=xy[None])  # TRIDENT's [1, N, D] is fine
    assert read_features(trident)[0].shape == (5, 8)


def test_feature_widths_differing_between_slides_name_both_files(tmp_path):
    from histobench.features.cache import FeatureDir

    _h5(tmp_path / "a.h5", features=np.zeros((4, 384), np.float32), coords=np.zeros((4, 2)))
    _h5(tmp_path / "b.h5", features=np.zeros((3, 1024), np.float32), coords=np.zeros((3, 2)))
    feats = FeatureDir(tmp_path)
    assert "a" in feats and "c" not in feats
    assert feats["a"].shape == (4, 384)
    with pytest.raises(HistobenchError, match=r"feature file .*b\.h5 has 1024-wide features but a\.h5 has 384: the "
                                              r"folder .* mixes encoders"):
        feats["b"]


@pytest.mark.parametrize("case,needle", [
    ("wrong_names", "has no 'features' dataset (has: coords, embeddings)"),
    ("other_width", "has 16-wide features but"),
])
def test_cli_evaluate_on_foreign_feature_files_is_one_line_and_loses_nothing(work, tmp_path, case, needle):
    folder = tmp_path / "trident"
    shutil.copytree(features_dir(work), folder)
    victim = folder / "DEMO-0003-01.h5"
    n = len(h5py.File(victim, "r")["coords"])
    victim.unlink()
    if case == "wrong_names":
        _h5(victim, embeddings=np.zeros((n, 8), np.float32), coords=np.zeros((n, 2), np.int64))
    else:
        _h5(victim, features=np.zeros((n, 16), np.float32), coords=np.zeros((n, 2), np.int64))
    before = snapshot(tmp_path, "trident")
    res = cli("evaluate", *DEMO, "-o", "eval.min_test_per_class=0", "--workdir", work, "--features", folder,
              "--no-track")
    one_line_error(res, "feature file", "DEMO-0003-01.h5", needle)
    assert_kept(before, tmp_path, "trident")


_FEATURES_FAIL_MIDWAY = """
import resource, signal, sys
from pathlib import Path
import numpy as np
from histobench.cli.common import handle_errors
from histobench.features.cache import FeatureWriter
FeatureWriter._check_space = lambda self, nbytes: None  # the space goes after the check: the write itself fails
out = Path(sys.argv[1])

@handle_errors
def extract():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
    writer = FeatureWriter(out / "big.h5", np.zeros((4096, 2), np.int64), {"tag": "x"})
    try:
        for start in range(0, 4096, 512):
            writer.append(np.ones((512, 64), np.float32))
        writer.close()
    except BaseException:
        writer.abort()  # what extraction does with the slide in flight
        raise

extract()
print("not reached")
"""


def test_a_feature_write_that_fails_for_want_of_space_ends_the_command_cleanly(tmp_path):
    """When the space goes between the check and the write, HDF5's failed file must never be closed (that
    crashes the process, SIGSEGV, even at interpreter exit): one error line, exit code 2, no .tmp left."""
    res = subprocess.run([sys.executable, "-c", _FEATURES_FAIL_MIDWAY, str(tmp_path)], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, COLUMNS="400"))
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: cannot write feature file {tmp_path / 'big.h5'}: File too large (the disk is full or a "
                     f"file-size limit was reached); the slides written before it are kept"], res.stderr[-2000:]
    assert "not reached" not in res.stdout
    assert list(tmp_path.iterdir()) == []
