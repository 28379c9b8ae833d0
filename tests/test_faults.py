"""Kill anywhere, then resume; and two runs at once on one work directory.

The fault suite SIGKILLs ``histobench run`` (and the single-stage commands ``pretrain`` and ``extract``) at
seeded moments: at fault points (:mod:`histobench.faults`: tiling, pretraining mid-epoch and mid-checkpoint,
extraction mid-file, evaluation mid-fold, MLflow logging), and from outside after a seeded wall-clock delay.
After each kill the same command runs again without the fault, and the case survives only if:

* the rerun exits 0 and its per-fold metrics (read from the MLflow store) and predictions are identical to an
  uninterrupted reference run with the same seed (``pretrain``: the same encoder tensors; ``extract``: the
  same feature arrays);
* every cache file in the work directory is readable and verified (tile sets, decoded-tile cache,
  checkpoints and encoder weights, feature files, segmentation files), and no temporary or lock file is left;
* the killed command's MLflow runs do not stay RUNNING (the rerun marks them FAILED);
* no file is lost: every output that existed before the killed command, and every finished output written
  before the kill, still exists with the same bytes (sha256).

The suite prints its figure: kills survived / kills tried, files lost. The default set is small (6 kills);
the full set (22 moments over all five areas) is marked ``faults`` and runs with ``-m faults`` or
``HISTOBENCH_FAULTS=1``. Each case starts from a copy of the reference work directory holding the stages
before the one it kills (as a work directory left by an earlier, interrupted run would), so that a kill late
in the pipeline does not pay for the early stages again.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

TINY = ["--task", "tcga-nsclc", "--demo", "-o", "task.demo_patients=6", "-o", "task.demo_slide_px=1024",
        "-o", "task.folds=2", "-o", "eval.epochs=3", "-o", "eval.min_test_per_class=0"]
TRAIN = ["-o", "train.epochs=1", "-o", "train.batch_size=16", "-o", "train.checkpoint_every=2"]
STAGES = ("demo", "splits", "tiles", "tilecache", "pretrain", "features")
# what each killed stage starts from: everything of the reference but that stage's own outputs
KEEP = {
    "tile": ("demo", "splits", "tilecache", "pretrain", "features"),
    "pretrain": ("demo", "splits", "tiles", "tilecache", "features"),
    "extract": ("demo", "splits", "tiles", "tilecache", "pretrain"),
    "evaluate": STAGES,
    "track": STAGES,
}
# progress files a resumed command legitimately rewrites (a checkpoint moves on to later steps)
PROGRESS = ("checkpoint.pt",)
FULL = "not (config.getoption('markexpr') and 'faults' in config.getoption('markexpr')) " \
       "and os.environ.get('HISTOBENCH_FAULTS') != '1'"


# ------------------------------------------------------------------------------------------- helpers
def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HISTOBENCH_FAULT")}
    env.update({"HF_HUB_OFFLINE": "1", "COLUMNS": "1000", "NO_COLOR": "1"}, **extra)
    return env


def _args(command: str, work: Path, store: Path | None) -> list[str]:
    base = [sys.executable, "-m", "histobench", command]
    if command == "run":
        return base + ["--pretext", "dino", *TINY, *TRAIN, "--workdir", str(work), "--tracking-uri", _uri(store)]
    if command == "pretrain":
        return base + ["--pretext", "dino", *TINY, *TRAIN, "--workdir", str(work)]
    if command == "extract":
        weights = next((work / "pretrain").glob("dino-*/encoder.pt"))
        return base + [*TINY, "--workdir", str(work), "--weights", str(weights)]
    raise ValueError(command)


def _uri(store: Path | None) -> str:
    return f"sqlite:///{store}"


def _start(command: str, work: Path, store: Path | None, log: Path, **env: str) -> subprocess.Popen:
    fh = open(log, "ab")
    fh.write(f"\n$ {command} {env}\n".encode())
    fh.flush()
    return subprocess.Popen(_args(command, work, store), stdout=fh, stderr=subprocess.STDOUT, env=_env(**env),
                            start_new_session=True)


def _run(command: str, work: Path, store: Path | None, log: Path, **env: str) -> int:
    return _start(command, work, store, log, **env).wait(900)


def _skip_file(rel: Path) -> bool:
    name = rel.name
    return rel.parts[0] == "runs" or name == "status.csv" or name.endswith((".lock", ".tmp")) or ".partial." in name


def snapshot(work: Path) -> dict[str, str]:
    """sha256 of every cached output under ``work`` (not run records, status tables, locks or temporaries)."""
    out = {}
    for f in sorted(work.rglob("*")):
        rel = f.relative_to(work)
        if f.is_file() and not _skip_file(rel):
            out[str(rel)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def verify_workdir(work: Path) -> list[str]:
    """Every cache file read back and checked; anything half-written or left behind is a problem."""
    import torch

    from histobench.features.cache import read_features
    from histobench.segment.cache import open_slide_file
    from histobench.slides.tiling import TileSet

    problems = []
    for f in sorted(work.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(work)
        name, top = f.name, rel.parts[0]
        try:
            if name.endswith((".lock", ".tmp")) or ".partial." in name:
                problems.append(f"left behind: {rel}")
            elif top == "tiles" and name.endswith(".npz"):
                t = TileSet.load(f)
                assert len(t) > 0 and t.source, "empty or without source"
            elif top == "tilecache" and name.endswith(".npy"):
                done = f.with_suffix(".done")
                assert done.exists(), "no .done marker"
                assert np.load(f, mmap_mode="r").shape[0] == int(done.read_text()), "row count"
            elif top == "pretrain" and name == "checkpoint.pt":
                state = torch.load(f, map_location="cpu", weights_only=True)
                assert state["step"] == state["total_steps"], f"step {state['step']}/{state['total_steps']}"
            elif top == "pretrain" and name == "encoder.pt":
                state = torch.load(f, map_location="cpu", weights_only=True)
                assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
            elif top == "features" and name.endswith(".h5"):
                feats, coords, attrs = read_features(f)
                assert feats.ndim == 2 and len(feats) == len(coords) > 0, f"shapes {feats.shape} {coords.shape}"
                assert np.isfinite(feats).all() and attrs.get("weights_hash"), "values or attributes"
            elif top == "segment" and name.endswith(".npz"):
                open_slide_file(f, verify=True)
        except Exception as err:  # noqa: BLE001 - every failure is a finding
            problems.append(f"{rel}: {type(err).__name__}: {err}")
    return problems


def _seed(ref: Path, work: Path, keep: tuple[str, ...]) -> None:
    work.mkdir(parents=True)
    for stage in keep:
        if (ref / stage).exists():
            shutil.copytree(ref / stage, work / stage)


def fold_metrics(store: Path) -> tuple[dict[str, dict[str, float]], str]:
    """Per-fold metrics of the latest finished parent run in ``store``, and its run id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_uri(store))
    exps = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(exps, "tags.`histobench.stage` = 'run' and attributes.status = 'FINISHED'",
                                 order_by=["attributes.start_time DESC"])
    assert parents, f"no finished run in {store}"
    rid = parents[0].info.run_id
    folds = client.search_runs(exps, f"tags.`mlflow.parentRunId` = '{rid}' and tags.`histobench.stage` = 'fold'")
    return {r.info.run_name: dict(r.data.metrics) for r in folds}, rid


def _running_runs(store: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_uri(store))
    exps = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_name for r in client.search_runs(exps, "attributes.status = 'RUNNING'")]


def _encoder_state(work: Path) -> dict:
    import torch

    (path,) = list((work / "pretrain").glob("dino-*/encoder.pt"))
    return torch.load(path, map_location="cpu", weights_only=True)


def _features(work: Path) -> dict[str, np.ndarray]:
    from histobench.features.cache import read_features

    return {str(f.relative_to(work)): read_features(f)[0] for f in sorted((work / "features").rglob("*.h5"))}


@dataclass
class Reference:
    root: Path
    work: Path
    store: Path
    empty_store: Path
    folds: dict
    predictions: str
    counts: dict[str, int]
    seconds: float
    encoder: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Reference:
    """One uninterrupted run with the tiny demo, traced: how often each fault point is passed."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("faults")
    empty = root / "empty.db"
    MlflowClient(tracking_uri=_uri(empty)).search_experiments()  # an initialised, empty store to copy per case
    work, store = root / "ref", root / "ref.db"
    shutil.copy(empty, store)
    trace = root / "trace.json"
    t0 = time.perf_counter()
    rc = _run("run", work, store, root / "ref.log", HISTOBENCH_FAULT_TRACE=str(trace))
    seconds = time.perf_counter() - t0
    assert rc == 0, (root / "ref.log").read_text()[-3000:]
    folds, rid = fold_metrics(store)
    assert len(folds) == 2 and all("macro_auc" in m for m in folds.values())
    counts = json.loads(trace.read_text())
    assert counts["tile.slide"] == 9 and counts["pretrain.step"] == 4, counts
    return Reference(root, work, store, empty, folds, (work / "runs" / rid / "predictions.csv").read_text(), counts,
                     seconds, _encoder_state(work), _features(work))


# ------------------------------------------------------------------------------------------- the cases
@dataclass
class Case:
    command: str  # run, pretrain, extract
    point: str | None  # a fault point, or None for an external kill after ``delay`` seconds
    n: int = 1
    delay: float = 0.0

    @property
    def area(self) -> str:
        return self.point.split(".")[0] if self.point else "pretrain"

    @property
    def label(self) -> str:
        return f"{self.command} @ {self.point}:{self.n}" if self.point else f"{self.command} @ SIGKILL after {self.delay:.1f} s"

    def keep(self) -> tuple[str, ...]:
        if self.command == "pretrain":
            return ("demo", "splits", "tiles", "tilecache")
        if self.command == "extract":
            return ("demo", "splits", "tiles", "pretrain")
        return KEEP[self.area]


@dataclass
class Outcome:
    case: Case
    killed: bool
    survived: bool
    lost: list[str]
    problems: list[str]
    seconds: float


def _count(ref: Reference, point: str, command: str) -> int:
    """How many passages of ``point`` the case's command makes (the traced reference; logging in a run whose
    earlier stages are cached makes fewer calls than a cold one: at least 12)."""
    if point == "track.log":
        return 12
    if point == "pretrain.checkpoint_half":  # passed only when armed; it sits in every checkpoint write
        return ref.counts["pretrain.checkpoint_rename"]
    return ref.counts[point]


def draw_cases(ref: Reference, seed: int, per_point: int, commands: dict[str, tuple[str, ...]],
               external: list[tuple[str, float, float]]) -> list[Case]:
    """Seeded moments: ``per_point`` draws of n for each point of each command, plus external kills
    ``(command, earliest, latest seconds)``."""
    rng = random.Random(seed)
    cases = []
    for command, points in commands.items():
        for point in points:
            count = _count(ref, point, command)
            for n in sorted(rng.sample(range(1, count + 1), min(per_point, count))):
                cases.append(Case(command, point, n))
    for command, lo, hi in external:
        cases.append(Case(command, None, delay=round(rng.uniform(lo, hi), 1)))
    return cases


def run_case(ref: Reference, case: Case, index: int) -> Outcome:
    t0 = time.perf_counter()
    work, store, log = ref.root / f"case{index}", ref.root / f"case{index}.db", ref.root / f"case{index}.log"
    _seed(ref.work, work, case.keep())
    shutil.copy(ref.empty_store, store)
    before = snapshot(work)
    if case.point:
        proc = _start(case.command, work, store, log, HISTOBENCH_FAULT=f"{case.point}:{case.n}")
    else:
        proc = _start(case.command, work, store, log)
        try:
            proc.wait(case.delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, as a node failure would
    rc = proc.wait(900)
    killed = rc == -signal.SIGKILL
    after_kill = snapshot(work)
    rc2 = _run(case.command, work, store, log)
    after = snapshot(work)
    lost = [f"{f} (existed before)" for f, h in before.items() if after.get(f) != h]
    lost += [f"{f} (finished before the kill)" for f, h in after_kill.items()
             if f not in before and Path(f).name not in PROGRESS and after.get(f) != h]
    problems = verify_workdir(work)
    if rc2 != 0:
        problems.append(f"rerun exited {rc2}: {log.read_text()[-1500:]}")
    else:
        problems += _compare(ref, case.command, work, store)
    ok = killed and not lost and not problems
    if ok:  # keep the disk small; failed cases stay for inspection
        shutil.rmtree(work, ignore_errors=True)
    return Outcome(case, killed, ok, lost, problems, time.perf_counter() - t0)


def _compare(ref: Reference, command: str, work: Path, store: Path) -> list[str]:
    """Differences between the rerun's results and the uninterrupted reference's."""
    import torch

    if command == "run":
        folds, rid = fold_metrics(store)
        out = [] if folds == ref.folds else [f"per-fold metrics differ: {folds} != {ref.folds}"]
        running = _running_runs(store)  # the killed run's, marked FAILED by the rerun (histobench.tracking)
        if running:
            out.append(f"MLflow runs left RUNNING: {running}")
        if (work / "runs" / rid / "predictions.csv").read_text() != ref.predictions:
            out.append("predictions differ")
        return out
    if command == "pretrain":
        state = _encoder_state(work)
        same = state.keys() == ref.encoder.keys() and all(torch.equal(state[k], ref.encoder[k]) for k in state)
        return [] if same else ["encoder weights differ from the uninterrupted pretraining"]
    feats = _features(work)
    if feats.keys() != ref.features.keys():
        return [f"feature files differ: {sorted(feats)} != {sorted(ref.features)}"]
    return [f"{k}: features differ" for k in feats if not np.array_equal(feats[k], ref.features[k])]


def run_suite(ref: Reference, cases: list[Case], label: str, capsys) -> list[Outcome]:
    """Run every case, printing one line per case as it ends, then the figure."""
    t0 = time.perf_counter()
    outcomes = []
    with capsys.disabled():
        print(f"\nfault suite ({label}): {len(cases)} moments", flush=True)
        for i, case in enumerate(cases):
            o = run_case(ref, case, i)
            outcomes.append(o)
            verdict = "survived" if o.survived else ("NOT KILLED" if not o.killed else "FAILED")
            print(f"  {o.case.label:<44} {verdict:<10} {o.seconds:5.1f} s  {'; '.join(o.lost + o.problems)[:300]}",
                  flush=True)
        tried = [o for o in outcomes if o.killed]
        survived = sum(o.survived for o in tried)
        lost = sum(len(o.lost) for o in outcomes)
        print(f"fault suite ({label}): {survived}/{len(tried)} kills survived, {lost} files lost, "
              f"{len(cases)} moments, {time.perf_counter() - t0:.0f} s", flush=True)
    return outcomes


def _assert_all_survived(outcomes: list[Outcome]) -> None:
    """Every kill survived; a fault point that was never reached is a failure too (an external kill that came
    after the command had finished is no kill, and is not counted)."""
    bad = [(o.case.label, o.killed, o.lost, o.problems) for o in outcomes
           if not o.survived and (o.killed or o.case.point)]
    assert not bad, bad


# ------------------------------------------------------------------------------------------- tests
def test_fault_points_are_free_when_unset_and_fire_at_the_nth_passage(monkeypatch):
    from histobench import faults

    monkeypatch.delenv(faults.ENV, raising=False)
    faults.reset()
    t0 = time.perf_counter()
    for _ in range(100_000):
        faults.fault_point("extract.batch")
    assert time.perf_counter() - t0 < 0.5  # near free
    assert not faults.armed()
    assert faults.parse("tile.slide:3, track.log:1") == {"tile.slide": 3, "track.log": 1}
    with pytest.raises(ValueError, match="NAME:N"):
        faults.parse("tile.slide:x")
    code = ("from histobench.faults import fault_point\n"
            "for i in range(1, 6):\n    print(i, flush=True)\n    fault_point('tile.slide')\n")
    p = subprocess.run([sys.executable, "-c", code], env=_env(HISTOBENCH_FAULT="tile.slide:3"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL and p.stdout.split() == ["1", "2", "3"]
    faults.reset()


def test_a_rerun_reuses_every_stage_and_matches(ref):
    """The reference's work directory, run again: nothing is redone or rewritten, the metrics are the same."""
    before = snapshot(ref.work)
    assert _run("run", ref.work, ref.store, ref.root / "ref.log") == 0
    assert snapshot(ref.work) == before
    assert fold_metrics(ref.store)[0] == ref.folds
    assert verify_workdir(ref.work) == []


def test_a_half_written_cache_file_is_redone_not_trusted(ref, tmp_path):
    """Truncate a tile set, a feature file and the checkpoint under their real names: the rerun redoes each
    and the metrics are unchanged."""
    work, store = tmp_path / "w", tmp_path / "s.db"
    _seed(ref.work, work, STAGES)
    shutil.copy(ref.empty_store, store)
    tiles = sorted((work / "tiles").rglob("*.npz"))[0]
    feats = sorted((work / "features").rglob("*.h5"))[0]
    ckpt = next((work / "pretrain").rglob("checkpoint.pt"))
    good = {p: p.read_bytes() for p in (tiles, feats)}
    for p in (tiles, feats, ckpt):
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    log = tmp_path / "log"
    assert _run("run", work, store, log) == 0, log.read_text()[-2000:]
    text = " ".join(log.read_text().split())  # a wrapped line is one line again
    assert "tiling the slide again" in text and "ignoring checkpoint" in text
    assert {p: p.read_bytes() for p in good} == good
    assert fold_metrics(store)[0] == ref.folds
    assert verify_workdir(work) == []


def test_two_runs_at_once_on_one_workdir_and_store(ref, tmp_path, capsys):
    """Two `histobench run` processes, same workdir and MLflow store, started together on a work directory
    holding only the cohort: both exit 0 with the reference's metrics; every file verifies."""
    work, store = tmp_path / "w", tmp_path / "s.db"
    _seed(ref.work, work, ("demo",))
    shutil.copy(ref.empty_store, store)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    t0 = time.perf_counter()
    procs = [_start("run", work, store, log) for log in logs]
    rcs = [p.wait(900) for p in procs]
    seconds = time.perf_counter() - t0
    texts = [log.read_text() for log in logs]
    assert rcs == [0, 0], [t[-2000:] for t in texts]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_uri(store))
    exps = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(exps, "tags.`histobench.stage` = 'run'")
    assert sorted(r.info.status for r in parents) == ["FINISHED", "FINISHED"]
    for parent in parents:
        rid = parent.info.run_id
        folds = client.search_runs(exps, f"tags.`mlflow.parentRunId` = '{rid}' and tags.`histobench.stage` = 'fold'")
        assert {r.info.run_name: dict(r.data.metrics) for r in folds} == ref.folds
        assert (work / "runs" / rid / "predictions.csv").read_text() == ref.predictions
    assert verify_workdir(work) == []
    assert snapshot(work).keys() == snapshot(ref.work).keys()  # the same files, once each
    waits = sum(t.count("waiting for ") for t in texts)
    with capsys.disabled():
        print(f"\ntwo runs at once: both exit 0 with the reference's metrics, {seconds:.0f} s "
              f"(single run {ref.seconds:.0f} s), {waits} waits on a lock")


@pytest.mark.timeout(1800)  # six kill-and-rerun cycles: minutes on a busy 2-core machine
def test_kill_and_rerun_default_set(ref, capsys):
    """Six seeded kills, one in each area and one from outside, each followed by a rerun."""
    rng = random.Random(14)
    picks = [("run", "tile.rename"), ("run", "pretrain.step"), ("run", "pretrain.checkpoint_half"),
             ("run", "extract.batch"), ("run", "evaluate.epoch"), ("run", "track.log")]
    cases = [Case(c, p, rng.randint(1, _count(ref, p, c))) for c, p in picks]
    outcomes = run_suite(ref, cases, "default", capsys)
    assert sum(o.killed for o in outcomes) == len(cases)
    _assert_all_survived(outcomes)


@pytest.mark.faults
@pytest.mark.timeout(7200)
@pytest.mark.skipif(FULL, reason="the full fault set runs with -m faults or HISTOBENCH_FAULTS=1")
def test_kill_and_rerun_full_set(ref, capsys):
    """At least 20 seeded moments over all five areas, the single-stage commands and external kills."""
    run_points = ("tile.slide", "tile.rename", "pretrain.step", "pretrain.checkpoint_half",
                  "pretrain.checkpoint_rename", "extract.batch", "evaluate.fold", "evaluate.epoch", "track.log")
    cases = draw_cases(ref, seed=2026, per_point=2, commands={"run": run_points}, external=[])
    cases += draw_cases(ref, seed=2027, per_point=1,
                        commands={"pretrain": ("pretrain.checkpoint_half",), "extract": ("extract.batch",)},
                        # a case's command has less to do than the cold reference (its first stages are cached)
                        external=[("run", 0.2 * ref.seconds, 0.5 * ref.seconds),
                                  ("pretrain", 0.1 * ref.seconds, 0.2 * ref.seconds)])
    assert len(cases) >= 20 and {c.area for c in cases} >= {"tile", "pretrain", "extract", "evaluate", "track"}
    outcomes = run_suite(ref, cases, "full", capsys)
    assert sum(o.killed for o in outcomes) >= 20
    _assert_all_survived(outcomes)
