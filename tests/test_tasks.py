"""Task cards (TCGA subtyping, TCGA survival, PANDA), their demo cohorts and their splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histobench.cohorts.splits import leaks_per_fold, task_splits
from histobench.cohorts.status import validate_manifest_rows
from histobench.errors import HistobenchError
from histobench.evaluate.metrics import METRICS
from histobench.registry import create, get_components

TASKS = sorted(get_components("task"))


@pytest.mark.parametrize("name", TASKS)
def test_task_card_contract(name):
    task = create("task", name, preset="demo")
    assert task.task_kind in ("subtyping", "grading", "survival")
    assert task.primary_metric in task.metrics and set(task.metrics) <= set(METRICS)
    assert task.options.mpp == 1.0 and task.options.tile_size == 64 and task.options.folds == 4
    assert task.options.split == "default"
    if task.task_kind == "survival":
        assert task.classes == ()
    if task.task_kind == "grading":
        assert task.classes == tuple("012345")


def test_expected_tasks_are_registered():
    assert {"tcga-nsclc", "tcga-brca", "tcga-rcc", "tcga-luad-survival", "panda"} <= set(TASKS)


def test_nsclc_labels_and_default_splits_do_not_leak(tmp_path):
    task = create("task", "tcga-nsclc")
    labels = task.labels()
    assert len(labels) == 958 and labels["case_id"].nunique() == 862
    assert labels["label"].value_counts().to_dict() == {"LUAD": 492, "LUSC": 466}
    splits = task_splits(task, labels, workdir=tmp_path)
    assert splits.folds == 10 and sum(leaks_per_fold(splits, labels).values()) == 0
    assert (tmp_path / "splits" / f"tcga-nsclc-{splits.name}-{splits.hash}.csv").exists()


def test_nsclc_hipt_preset_is_restricted_to_the_manifest_and_leaks(tmp_path):
    task = create("task", "tcga-nsclc", {"split": "hipt-10fold"})
    labels = task.labels()
    splits = task_splits(task, labels, workdir=tmp_path)
    assert splits.name == "hipt-10fold" and splits.folds == 10 and splits.slide_level
    per_fold = leaks_per_fold(splits, labels)
    assert per_fold == {0: 14, 1: 19, 2: 17, 3: 16, 4: 14, 5: 12, 6: 12, 7: 16, 8: 14, 9: 16}
    half = labels.iloc[::2]
    small = task_splits(task, half, workdir=tmp_path)
    assert set(small.table["slide_id"]) <= set(half["slide_id"])
    with pytest.raises(HistobenchError, match="no split preset 'nope'; available: default, hipt-10fold"):
        task_splits(task, labels, workdir=tmp_path, preset="nope")


def test_brca_rcc_labels_from_cdr():
    brca = create("task", "tcga-brca").labels()
    assert brca["label"].value_counts().to_dict() == {"IDC": 784, "ILC": 203}
    rcc = create("task", "tcga-rcc").labels()
    assert rcc["label"].value_counts().to_dict() == {"KIRC": 537, "KIRP": 291, "KICH": 113}
    assert rcc["case_id"].str.len().eq(12).all()


def test_survival_labels_and_bad_times_are_reported():
    task = create("task", "tcga-luad-survival")
    labels = task.labels()
    assert len(labels) == 522 and set(labels["event"].dropna()) == {0.0, 1.0}
    df = labels.assign(slide_id=labels["case_id"] + "-01Z-00-DX1", path="x.svs")
    good, problems = validate_manifest_rows(df, task)
    bad = labels["time"].isna() | (labels["time"] <= 0)
    assert len(good) == len(labels) - bad.sum() and len(problems) == bad.sum() > 0


def _fake_tcga_root(tmp_path: Path, case_ids: list[str]) -> Path:
    root = tmp_path / "gdc"
    for i, case in enumerate(case_ids):
        d = root / f"uuid-{i}"
        d.mkdir(parents=True)
        (d / f"{case}-01Z-00-DX1.ABC{i}.svs").write_bytes(b"x")
        (d / f"{case}-01A-01-TS1.DEF{i}.svs").write_bytes(b"x")  # frozen section: not used
    return root


def test_patient_level_cohort_uses_dx_slides_of_labelled_patients(tmp_path):
    task = create("task", "tcga-rcc")
    labels = task.labels()
    cases = list(labels["case_id"][:3]) + ["TCGA-ZZ-9999"]
    manifest = task.cohort(_fake_tcga_root(tmp_path, cases))
    assert len(manifest) == 3 and manifest["slide_id"].str.contains("-DX1").all()
    assert list(manifest.columns[:4]) == ["slide_id", "case_id", "path", "label"]
    with pytest.raises(HistobenchError, match="no slide of task tcga-rcc"):
        task.cohort(tmp_path / "gdc" / "uuid-3")


def test_survival_task_splits_stratify_by_event(tmp_path):
    task = create("task", "tcga-luad-survival")
    labels = task.labels().dropna()
    labels = labels[labels["time"] > 0]
    df = labels.assign(slide_id=labels["case_id"] + "-DX1", path="x")
    splits = task_splits(task, df, workdir=tmp_path)
    assert splits.folds == 5 and splits.name.startswith("5fold-event")
    events = df.set_index("case_id")["event"]
    rates = [events.loc[splits.cases(k, "test")].mean() for k in range(5)]
    assert max(rates) - min(rates) < 0.05
    hipt = task_splits(task, df, workdir=tmp_path, preset="hipt-5fold")
    assert hipt.folds == 5 and not hipt.slide_level and sum(leaks_per_fold(hipt).values()) == 0


# ------------------------------------------------------------------------------------------ demo cohorts


def test_grading_demo_cohort_is_ordinal(tmp_path):
    from histobench.slides.reader import open_slide
    from histobench.slides.synthetic import GRADE_TUMOUR_FRACTION, make_grading_cohort

    df = make_grading_cohort(tmp_path, n_patients=6, seed=0, size=(512, 512), slides_per_patient=(1, 2))
    assert sorted(df.drop_duplicates("case_id")["label"]) == list("012345")
    assert (df.groupby("case_id").size() > 1).any()
    # a benign (grade 0) slide has no tumour nuclei sheet: it is lighter in haematoxylin than a grade-5 one
    def darkness(label):
        path = tmp_path / df[df["label"] == label]["path"].iloc[0]
        with open_slide(path) as s:
            rgb = s.read_region(0, 0, 0, 512, 512).astype(float)
        return 255 - rgb[..., 0][rgb.min(-1) < 220].mean()
    assert darkness("5") > darkness("0")
    assert GRADE_TUMOUR_FRACTION[0] == 0 and np.all(np.diff(GRADE_TUMOUR_FRACTION) > 0)
    again = make_grading_cohort(tmp_path, n_patients=6, seed=0, size=(512, 512), slides_per_patient=(1, 2))
    pd.testing.assert_frame_equal(df, again)  # cached: nothing regenerated


def test_survival_demo_cohort_hazard_follows_the_tissue_feature(tmp_path):
    from histobench.evaluate.metrics import METRICS
    from histobench.slides.synthetic import make_survival_cohort, simulate_survival

    burden = np.random.default_rng(0).uniform(0.05, 0.6, 400)
    time, event = simulate_survival(burden, seed=0)
    assert 0.15 < 1 - event.mean() < 0.6 and (time > 0).all()
    cindex = METRICS["c_index"](np.stack([time, event], 1), burden)  # higher burden = higher risk
    assert cindex > 0.7
    df = make_survival_cohort(tmp_path, n_patients=6, seed=0, size=(512, 512), slides_per_patient=(1, 2))
    assert {"time", "event", "tumour_fraction"} <= set(df.columns)
    per_patient = df.groupby("case_id")[["time", "event", "tumour_fraction"]].nunique()
    assert (per_patient == 1).all().all()  # a patient's slides share its outcome and burden
    good, problems = validate_manifest_rows(df.assign(path="x"), create("task", "tcga-luad-survival"))
    assert problems == [] and len(good) == len(df)


def test_demo_cohort_of_task_cards(tmp_path):
    task = create("task", "panda", {"demo_patients": 6, "demo_slide_px": 512}, preset="demo")
    df = task.demo_cohort(tmp_path / "panda", seed=0)
    assert set(df["label"]) == set(task.classes) and all(Path(p).exists() for p in df["path"])
    task = create("task", "tcga-kirc-survival", {"demo_patients": 4, "demo_slide_px": 512}, preset="demo")
    df = task.demo_cohort(tmp_path / "surv", seed=0)
    assert {"time", "event"} <= set(df.columns) and all(Path(p).exists() for p in df["path"])


def test_grading_and_survival_demo_slides_tile_at_the_demo_preset(tmp_path):
    from histobench.slides.reader import open_slide
    from histobench.slides.tiling import tile_slide

    task = create("task", "panda", {"demo_patients": 6, "demo_slide_px": 1024}, preset="demo")
    df = task.demo_cohort(tmp_path, seed=0)
    o = task.options
    for row in df.drop_duplicates("case_id").itertuples():
        with open_slide(row.path) as s:
            tiles = tile_slide(s, mpp=o.mpp, tile_size=o.tile_size, min_tissue=o.min_tissue)
        assert len(tiles) >= 4, row.slide_id  # every grade, benign included, has tissue to tile (of 16)


# ----------------------------------------------------------- demo cohort options


def test_demo_signal_fraction_default_is_the_generator_default():
    from histobench.slides import synthetic

    task = create("task", "tcga-nsclc", preset="demo")
    assert task.options.demo_signal_fraction == 0.35
    assert task.options.demo_signal_fraction == \
        synthetic.make_demo_cohort.__kwdefaults__["signal_fraction"]


def test_demo_signal_fraction_reaches_the_cohort(tmp_path):
    import json

    from histobench.slides import synthetic

    kw = {"demo_patients": 4, "demo_slide_px": 512}
    digests = {}
    for sf in (0.35, 0.1):
        task = create("task", "tcga-nsclc", {**kw, "demo_signal_fraction": sf}, preset="demo")
        out = tmp_path / f"sf{sf}"
        df = task.demo_cohort(out, seed=0)
        params = json.loads((out / "demo_params.json").read_text())
        assert params["signal_fraction"] == sf
        digests[sf] = synthetic.file_digest(df["path"].iloc[0])
    assert digests[0.1] != digests[0.35]  # a smaller tumour region: other pixels
