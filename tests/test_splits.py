"""Patient-level stratified splits: coverage, no leaks, stratification, hashing, files, audit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from histobench.cohorts.splits import Splits, make_splits
from histobench.errors import HistobenchError


def manifest(n_patients: int = 90, seed: int = 0) -> pd.DataFrame:
    """Patients with 1-3 slides each, three unbalanced classes (60% / 30% / 10%)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = ["A", "B", "C"][int(rng.choice(3, p=[0.6, 0.3, 0.1]))]
        for s in range(int(rng.integers(1, 4))):
            rows.append({"slide_id": f"S{p:03d}-{s}", "case_id": f"P{p:03d}", "path": f"x/{p}/{s}.tif", "label": label})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("val_fraction", [0.0, 0.2])
def test_every_patient_in_exactly_one_test_fold_and_one_side(val_fraction):
    m = manifest()
    sp = make_splits(m, folds=5, seed=1, val_fraction=val_fraction)
    patients = set(m["case_id"])
    assert sp.folds == 5
    test_folds = sp.table[sp.table["split"] == "test"].groupby("case_id")["fold"].nunique()
    assert set(test_folds.index) == patients and (test_folds == 1).all()
    for k in range(5):
        train, val, test = (set(sp.cases(k, s)) for s in ("train", "val", "test"))
        assert not (train & test) and not (train & val) and not (val & test)
        assert train | val | test == patients
        assert bool(val) == (val_fraction > 0)
        if val_fraction:
            assert abs(len(val) - val_fraction * (len(train) + len(val))) <= 3
    assert sp.audit(m).empty
    assert list(sp.audit(m).columns) == ["fold", "case_id", "sides"]


def test_fold_sizes_and_class_proportions():
    m = manifest(200)
    sp = make_splits(m, folds=5, seed=3)
    per_patient = m.drop_duplicates("case_id").set_index("case_id")["label"]
    overall = per_patient.value_counts(normalize=True)
    sizes = [len(sp.cases(k, "test")) for k in range(5)]
    assert max(sizes) - min(sizes) <= 1
    for k in range(5):
        counts = per_patient.loc[sp.cases(k, "test")].value_counts()
        for label, share in overall.items():
            # each stratum is dealt round-robin: at most one patient off the exact share per fold
            assert abs(counts.get(label, 0) - share * per_patient.size / 5) <= 1.0 + 1e-9


def test_majority_label_is_the_stratum():
    m = pd.DataFrame(
        {"slide_id": [f"s{i}" for i in range(12)], "case_id": ["p1"] * 3 + [f"q{i}" for i in range(9)],
         "label": ["A", "B", "B"] + ["A"] * 9}
    )
    sp = make_splits(m, folds=3, seed=0)
    assert sp.audit(m).empty and len(sp.cases(0, "test")) + len(sp.cases(1, "test")) + len(sp.cases(2, "test")) == 10


def test_hash_is_deterministic_and_seed_dependent(tmp_path):
    m = manifest()
    a, b = make_splits(m, folds=5, seed=7), make_splits(m, folds=5, seed=7)
    c = make_splits(m, folds=5, seed=8)
    assert a.hash == b.hash and len(a.hash) == 16
    assert a.hash != c.hash
    shuffled = Splits(a.table.sample(frac=1.0, random_state=0), name="x")
    assert shuffled.hash == a.hash and shuffled == a  # row order does not matter
    assert "hash=" in repr(a) and a != c
    path = a.save(tmp_path / "sub" / "splits.csv")
    import hashlib

    assert hashlib.sha256(path.read_bytes()).hexdigest()[:16] == a.hash
    loaded = Splits.load(path)
    assert loaded.hash == a.hash and loaded.name == "splits"
    pd.testing.assert_frame_equal(loaded.table, a.table)
    assert not list((tmp_path / "sub").glob("*.tmp"))


def test_numeric_like_ids_survive_a_round_trip(tmp_path):
    m = pd.DataFrame({"slide_id": ["001", "002", "003", "004"], "case_id": ["007", "008", "009", "010"], "label": [0, 1, 0, 1]})
    sp = make_splits(m, folds=2, seed=0)
    loaded = Splits.load(sp.save(tmp_path / "s.csv"))
    assert loaded.hash == sp.hash and "007" in set(loaded.table["case_id"])


def test_audit_finds_a_planted_leak():
    m = manifest()
    sp = make_splits(m, folds=5, seed=0)
    t = sp.table.copy()
    victim = sp.cases(2, "test")[0]
    t = pd.concat([t, pd.DataFrame({"fold": [2], "split": ["train"], "case_id": [victim]})])
    leaks = Splits(t).audit(m)
    assert leaks.to_dict("records") == [{"fold": 2, "case_id": victim, "sides": "train,test"}]


def test_slide_level_table_keeps_duplicates_for_the_audit():
    m = manifest(30)
    two = m.groupby("case_id").filter(lambda g: len(g) >= 2)
    patient = two["case_id"].iloc[0]
    slides = list(m.loc[m["case_id"] == patient, "slide_id"])
    others = [s for s in m["slide_id"] if s not in slides]
    rows = [{"fold": 0, "split": "test", "slide_id": slides[0]}, {"fold": 0, "split": "train", "slide_id": slides[1]}]
    rows += [{"fold": 0, "split": "train" if i % 2 else "test", "slide_id": s} for i, s in enumerate(others)]
    sp = Splits.from_slide_table(pd.DataFrame(rows), m)
    assert sp.slide_level and slides[1] in sp.slides(0, "train")
    leaks = sp.audit(m)
    assert patient in set(leaks["case_id"])
    assert set(leaks.loc[leaks["case_id"] == patient, "sides"]) == {"train,test"}
    with pytest.raises(HistobenchError, match="not in the manifest"):
        Splits.from_slide_table(pd.DataFrame([{"fold": 0, "split": "test", "slide_id": "nope"}]), m)


def test_bad_inputs():
    m = manifest(10)
    with pytest.raises(HistobenchError):
        make_splits(m, folds=20, seed=0)
    with pytest.raises(HistobenchError):
        make_splits(m, folds=2, seed=0, stratify="missing")
    with pytest.raises(HistobenchError):
        Splits(pd.DataFrame({"fold": [0], "split": ["holdout"], "case_id": ["a"]}))
    sp = make_splits(m.assign(event=np.arange(len(m)) % 2), folds=2, seed=0, stratify="event")
    assert sp.audit(m).empty


# ------------------------------------------------------------------------- presets, task splits, leaks


def test_published_folder_slide_and_case_level(tmp_path):
    from histobench.cohorts.splits import load_preset, read_published_table

    m = manifest(12)
    slides = sorted(m["slide_id"])
    # slide-level (HIPT style): a blank-padded train/val/test table per fold, one planted leak in fold 1
    for k in range(2):
        f = pd.DataFrame({"train": slides[:8], "val": slides[8:10] + [""] * 6, "test": slides[10:12] + [""] * 6})
        if k == 1:
            f.loc[0, "test"] = slides[1]  # shares a patient with train (or is train) -> a leak
        f.to_csv(tmp_path / f"splits_{k}.csv")
    long = read_published_table(tmp_path)
    assert set(long["split"]) == {"train", "val", "test"}
    splits, dropped = load_preset(tmp_path, m[m["slide_id"] != slides[0]], name="pub")
    assert splits.slide_level and dropped == 1
    assert len(splits.audit(m)[lambda a: a["fold"] == 1]) >= 1
    # case-level (MCAT style): train/val where val is the held-out side
    cases = sorted(m["case_id"].unique())
    d2 = tmp_path / "cases"
    d2.mkdir()
    pd.DataFrame({"train": cases[:9], "val": cases[9:] + [""] * 6}).to_csv(d2 / "splits_0.csv")
    pd.DataFrame({"train": cases[3:], "val": cases[:3] + [""] * 6}).to_csv(d2 / "splits_1.csv")
    splits, _ = load_preset(d2, m, name="cases")
    assert not splits.slide_level and splits.cases(0, "test") == cases[9:]
    with pytest.raises(HistobenchError, match="no splits_<k>.csv"):
        read_published_table(tmp_path / "nowhere")


def test_check_leaks_refuses_unless_allowed():
    from histobench.cohorts.splits import check_leaks, leaks_per_fold

    m = manifest(30)
    clean = make_splits(m, folds=3, seed=0)
    assert check_leaks(clean, m) == 0 and leaks_per_fold(clean, m) == {0: 0, 1: 0, 2: 0}
    table = clean.table.copy()
    case = table.loc[(table["fold"] == 0) & (table["split"] == "test"), "case_id"].iloc[0]
    table.loc[len(table)] = {"fold": 0, "split": "train", "case_id": case}
    leaky = Splits(table, name="leaky")
    with pytest.raises(HistobenchError, match="leaks: 1 patient-fold"):
        check_leaks(leaky, m)
    assert check_leaks(leaky, m, allow_leaks=True) == 1
    assert leaks_per_fold(leaky, m) == {0: 1, 1: 0, 2: 0}
