"""Data parallelism under ``torchrun``: two gloo ranks on the CPU.

One ``torch.distributed.run --nproc_per_node=2`` launch (shared by the tests of this module) pretrains DINO
(demo preset) on synthetic tiles, then a deterministic toy pretext (a linear encoder, a squared-error loss
and a module no step uses), then extracts features of three synthetic slides; each rank writes what it saw
and what it trained to ``rank<r>.json``. The toy run is repeated in one process on the whole batches: with
gradients averaged correctly over the two halves, both give the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

BATCH, STEPS = 8, 3

SCRIPT = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    from histobench.components import Encoder, Pretext
    from histobench.features.cache import weights_hash
    from histobench.features.extract import extract_features
    from histobench.pretrain import trainer
    from histobench.pretrain.data import SlideTiles, SyntheticTileDataset
    from histobench.registry import create
    from histobench.slides.reader import open_slide
    from histobench.slides.tiling import tile_slide

    out = Path(sys.argv[1])
    BATCH, STEPS = int(sys.argv[2]), int(sys.argv[3])

    class Recording(SyntheticTileDataset):
        seen = []

        def __getitem__(self, idx):
            Recording.seen.append(int(idx))
            return super().__getitem__(idx)

    class ToyEncoder(Encoder):
        name = "toy-linear"

        def build(self):
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))

    class ToyPretext(Pretext):
        """Squared error of the encoder's output against a fixed target: a deterministic mean over the batch."""

        name = "toy"

        def setup(self, encoder, ctx):
            self.encoder = encoder
            self.spare = torch.nn.Linear(2, 2)  # trained but never called: DDP must not wait for its gradient

        def student_modules(self):
            return {"encoder": self.encoder, "spare": self.spare}

        def training_step(self, batch, step):
            x = batch["images"][:, :, :8, :8].float() / 255.0
            return {"loss": (self.encoder(x) - 1.0).pow(2).mean()}

        def state_dict(self):
            return {"encoder": self.encoder.state_dict(), "spare": self.spare.state_dict()}

        def load_state_dict(self, state):
            self.encoder.load_state_dict(state["encoder"])
            self.spare.load_state_dict(state["spare"])

        def trained_encoder(self):
            return self.encoder

    ddp_wraps = []
    _ddp_init = torch.nn.parallel.DistributedDataParallel.__init__

    def _counting_init(self, *args, **kwargs):
        ddp_wraps.append("static" if kwargs.get("static_graph") else "dynamic" if kwargs.get("find_unused_parameters") else "?")
        _ddp_init(self, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel.__init__ = _counting_init

    saves = []
    _save = trainer._save_atomic
    trainer._save_atomic = lambda obj, path: (saves.append(str(path)), _save(obj, path))[1]

    rank, world = trainer.init_distributed()
    pre = create("pretext", "dino", None, preset="demo")
    enc = create("encoder", "timm", None, preset="demo")
    opts = type(pre).train_options("demo", epochs=1, batch_size=BATCH, num_workers=0, steps_per_epoch=STEPS,
                                   warmup_epochs=0, checkpoint_every=1)
    data = Recording(BATCH * STEPS, 64, seed=0)
    res = trainer.pretrain(pre, enc, data, opts, out_dir=out / "pretrain", seed=0, device="cpu")

    # SLPD across its warm-up boundary: epoch 0 is plain DINO, epoch 1 adds the prototype terms
    from histobench_slpd.data import synthetic_grid_cohort

    slpd = create("pretext", "slpd", {"warm_epoch": 0, "min_regions": 4, "n_prototypes": 2}, preset="demo")
    region_enc = create("encoder", "hipt-vit4k", {"in_dim": 16}, preset="demo")
    grids = synthetic_grid_cohort(n_slides=4, regions_per_slide=8, dim=16, grid=8, seed=0)
    slpd_opts = type(slpd).train_options("demo", epochs=2, batch_size=BATCH, num_workers=0, steps_per_epoch=2,
                                         warmup_epochs=0, checkpoint_every=0)
    slpd_res = trainer.pretrain(slpd, region_enc, grids, slpd_opts, out_dir=out / "slpd", seed=0, device="cpu",
                                resume=False)

    toy_opts = ToyPretext.train_options(None, epochs=1, batch_size=BATCH, num_workers=0, steps_per_epoch=STEPS,
                                        warmup_epochs=0, lr=0.05, weight_decay=0.0, weight_decay_end=0.0,
                                        clip_grad=0.0)
    toy_data = SyntheticTileDataset(BATCH * STEPS, 16, seed=1)
    toy_start = torch.cat([p.detach().reshape(-1) for p in ToyEncoder().build().parameters()]).tolist()
    toy = trainer.pretrain(ToyPretext(), ToyEncoder(), toy_data, toy_opts, out_dir=out / "toy", seed=0,
                           device="cpu", resume=False)
    toy_weights = torch.cat([p.detach().reshape(-1) for p in toy.encoder.parameters()]).tolist()
    if rank == 0:  # the same run in one process on the whole batches (no process group in this call)
        real = trainer._dist, trainer.init_distributed
        trainer._dist, trainer.init_distributed = (lambda: None), (lambda: (0, 1))
        try:
            single = trainer.pretrain(ToyPretext(), ToyEncoder(), toy_data, toy_opts, out_dir=out / "toy-single",
                                      seed=0, device="cpu", resume=False)
        finally:
            trainer._dist, trainer.init_distributed = real
        single_weights = torch.cat([p.detach().reshape(-1) for p in single.encoder.parameters()]).tolist()
    else:
        single_weights = None

    slides = []
    for p in sorted((out / "slides").glob("*.tiff")):
        s = open_slide(p)
        slides.append(SlideTiles(p.stem, p, tile_slide(s, mpp=1.0, tile_size=64, min_tissue=0.0)))
    before = {p.name for p in (out / "features").glob("*.h5")} if (out / "features").exists() else set()
    ex = extract_features(res.encoder, enc.transform(), slides, out / "features", encoder_name="timm-demo",
                          weights=weights_hash(res.encoder), batch_size=16, num_workers=0, device="cpu")
    json.dump({
        "rank": rank, "world": world, "seen": Recording.seen, "saves": saves,
        "encoder_hash": weights_hash(res.encoder),
        "student_hash": weights_hash(pre.student),
        "losses": [h["loss"] for h in res.history],
        "ddp_wraps": ddp_wraps, "slpd_hash": weights_hash(slpd.student),
        "slpd_losses": [h["loss"] for h in slpd_res.history],
        "slpd_intra": [h["loss_intra"] for h in slpd_res.history], "toy_weights": toy_weights, "toy_start_weights": toy_start,
        "toy_single_weights": single_weights,
        "toy_losses": [h["loss"] for h in toy.history],
        "extracted": ex.extracted, "tiles": ex.tiles,
    }, open(out / f"rank{rank}.json", "w"))
''')


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    from histobench.slides.synthetic import write_synthetic_slide

    out = tmp_path_factory.mktemp("ddp")
    for i in range(3):
        write_synthetic_slide(out / "slides" / f"slide{i}.tiff", class_index=i % 2, n_classes=2, seed=i,
                              size=(256 + 64 * i, 256), mpp=0.5)
    script = out / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script), str(out),
         str(BATCH), str(STEPS)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    return out, proc


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_both_ranks_exit_cleanly(launched):
    out, proc = launched
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = _ranks(out)
    assert [r["world"] for r in ranks] == [2, 2]


def test_parameters_identical_after_training(launched):
    out, proc = launched
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = _ranks(out)
    assert r0["student_hash"] == r1["student_hash"]
    assert r0["encoder_hash"] == r1["encoder_hash"]
    assert r0["losses"] == r1["losses"]  # the logged loss is the mean over ranks
    assert len(r0["losses"]) == STEPS and all(np.isfinite(r0["losses"]))


def test_each_rank_sees_a_disjoint_half_of_every_global_batch(launched):
    from histobench.pretrain.trainer import epoch_batches

    out, proc = launched
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = _ranks(out)
    global_batches = epoch_batches(BATCH * STEPS, BATCH, 0, 0)[:STEPS]
    half = BATCH // 2
    for b, full in enumerate(global_batches):
        a, c = r0["seen"][b * half:(b + 1) * half], r1["seen"][b * half:(b + 1) * half]
        assert not set(a) & set(c)
        assert sorted(a + c) == sorted(full)


def test_checkpoints_are_written_by_rank_zero_only(launched):
    out, proc = launched
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = _ranks(out)
    assert r1["saves"] == []
    assert len(r0["saves"]) >= STEPS and (out / "pretrain" / "checkpoint.pt").exists()


def test_extraction_shards_slides_across_ranks(launched):
    from histobench.features.cache import read_features

    out, proc = launched
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = _ranks(out)
    assert (r0["extracted"], r1["extracted"]) == (2, 1)  # slide i goes to rank i % 2
    files = sorted(p.name for p in (out / "features").glob("*.h5"))
    assert files == ["slide0.h5", "slide1.h5", "slide2.h5"]
    assert not list((out / "features").glob("*.tmp"))
    total = sum(len(read_features(out / "features" / f)[0]) for f in files)
    assert total == r0["tiles"] + r1["tiles"]


def test_training_goes_through_distributed_data_parallel(launched):
    out, proc = launched
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = _ranks(out)
    # one DDP wrapper per training run on each rank: DINO and SLPD declare a static graph; the toy pretext
    # keeps the default (find unused parameters every step) and has one
    assert r0["ddp_wraps"] == r1["ddp_wraps"] == ["static", "static", "dynamic"]


def test_slpd_ranks_stay_identical_across_the_warm_up_boundary(launched):
    out, proc = launched
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = _ranks(out)
    assert r0["slpd_hash"] == r1["slpd_hash"]
    assert r0["slpd_losses"] == r1["slpd_losses"] and all(np.isfinite(r0["slpd_losses"]))
    # epoch 0 (2 steps) is plain DINO; epoch 1 trains the prototype terms through the same DDP wrapper
    assert r0["slpd_intra"][:2] == [0.0, 0.0] and all(v > 0 for v in r0["slpd_intra"][2:])


def test_gradients_are_averaged_like_one_process_on_the_whole_batch(launched):
    out, proc = launched
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = _ranks(out)
    assert r0["toy_weights"] == r1["toy_weights"]
    two_ranks, one_process = np.array(r0["toy_weights"]), np.array(r0["toy_single_weights"])
    start = np.array(r0["toy_start_weights"])
    assert np.abs(two_ranks - start).max() > 1e-3  # it trained
    assert np.abs(two_ranks - one_process).max() < 1e-5
    assert len(r0["toy_losses"]) == STEPS and r0["toy_losses"][-1] < r0["toy_losses"][0]


def test_histobench_run_under_torchrun(tmp_path):
    """`torchrun -m histobench run`: both ranks pretrain and extract, rank 0 alone evaluates, logs and prints."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "histobench",
         "run", "--pretext", "dino", "--task", "tcga-nsclc", "--demo", "--workdir", str(tmp_path / "work"),
         "--tracking-uri", uri, "-o", "task.demo_patients=6", "-o", "task.demo_slide_px=1024", "-o", "task.folds=2", "-o", "eval.min_test_per_class=0",
         "-o", "train.epochs=1", "-o", "train.batch_size=16", "-o", "eval.epochs=2"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("mean ± sd") == 1  # one result table: rank 0's
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tcga-nsclc").experiment_id])
    stages = sorted(r.data.tags["histobench.stage"] for r in runs)
    assert stages == ["extract", "fold", "fold", "pretrain", "run"]  # logged once, by rank 0
    manifest = (tmp_path / "work" / "demo" / "tcga-nsclc" / "manifest.csv").read_text().splitlines()[1:]
    features = list((tmp_path / "work" / "features").glob("*/*.h5"))
    assert len(features) == len(manifest)  # both ranks' shares of the slides were extracted
    status = (tmp_path / "work" / "status.csv").read_text().splitlines()[1:]
    assert len(status) == len(manifest)  # one tiling record per slide: rank 0 alone wrote the status file
