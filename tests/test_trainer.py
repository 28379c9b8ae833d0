"""The one pretraining loop: exact resume, non-finite stop, OOM messages, progress and tracking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from histobench.errors import HistobenchError
from histobench.pretrain.data import SyntheticTileDataset
from histobench.pretrain.trainer import CHECKPOINT, NonFiniteLossError, pretrain
from histobench.registry import create
from histobench.reporting import Reporter

BATCH, STEPS_PER_EPOCH, EPOCHS = 4, 3, 2
# Smaller than the demo presets: these tests run many short trainings on a shared 2-core CPU.
_DINO = {"out_dim": 128, "hidden_dim": 32, "bottleneck_dim": 16, "n_local_crops": 2, "global_crop_size": 32,
         "local_crop_size": 16}
_ENCODER = {"img_size": 32, "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}


def _components(pretext_cls=None):
    pre = create("pretext", "dino", _DINO, preset="demo")
    if pretext_cls is not None:
        pre = pretext_cls(pre.options)
    enc = create("encoder", "timm", _ENCODER, preset="demo")
    return pre, enc


def _opts(pre, **kw):
    base = dict(epochs=EPOCHS, batch_size=BATCH, num_workers=0, steps_per_epoch=STEPS_PER_EPOCH, warmup_epochs=0)
    return type(pre).train_options("demo", **{**base, **kw})


def _data():
    return SyntheticTileDataset(BATCH * STEPS_PER_EPOCH, 32, seed=0)


def _run(out_dir, pretext_cls=None, reporter=None, tracker=None, **kw):
    max_steps = kw.pop("max_steps", None)
    pre, enc = _components(pretext_cls)
    return pretrain(pre, enc, _data(), _opts(pre, **kw), out_dir=out_dir, seed=0, device="cpu",
                    max_steps=max_steps, reporter=reporter, tracker=tracker)


def _losses(result):
    return [h["loss"] for h in result.history]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted run: 2 epochs of 3 steps, checkpoints every 2 steps (and at epoch ends)."""
    return _run(tmp_path_factory.mktemp("full"), checkpoint_every=2)


class _Interrupt(Exception):
    pass


def _crashing_dino(at_step: int):
    from histobench_dino.pretext import DINO

    class CrashingDINO(DINO):
        def after_optimizer_step(self, step):
            super().after_optimizer_step(step)
            if step == at_step:  # the process dies after this step's update, before its checkpoint
                raise _Interrupt

    return CrashingDINO


def test_resume_after_a_mid_epoch_crash_repeats_the_losses(full_run, tmp_path):
    losses = _losses(full_run)
    assert len(losses) == EPOCHS * STEPS_PER_EPOCH and all(math.isfinite(v) for v in losses)
    # Crash in step index 4 (mid-epoch 1, after the update): the last checkpoint is the one after 4 steps.
    with pytest.raises(_Interrupt):
        _run(tmp_path, pretext_cls=_crashing_dino(4), checkpoint_every=2)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["step"] == 4
    resumed = _run(tmp_path, checkpoint_every=2)
    assert resumed.resumed_from == 4
    assert _losses(resumed) == pytest.approx(losses, rel=1e-5, abs=1e-6)
    from histobench.features.cache import weights_hash

    assert weights_hash(resumed.encoder) == weights_hash(full_run.encoder)


def test_resume_after_max_steps_stop_mid_epoch(full_run, tmp_path):
    part = _run(tmp_path, checkpoint_every=2, max_steps=5)  # stops inside epoch 1; saves at the stop
    assert part.steps == 5 and torch.load(tmp_path / CHECKPOINT, weights_only=False)["step"] == 5
    resumed = _run(tmp_path, checkpoint_every=2)
    assert resumed.resumed_from == 5 and resumed.steps == EPOCHS * STEPS_PER_EPOCH
    assert _losses(resumed) == pytest.approx(_losses(full_run), rel=1e-5, abs=1e-6)


def _nan_dino(at_step: int):
    from histobench_dino.pretext import DINO

    class NaNDINO(DINO):
        def training_step(self, batch, step):
            out = super().training_step(batch, step)
            if step == at_step:
                out["loss"] = out["loss"] * float("nan")
            return out

    return NaNDINO


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    good = _run(tmp_path / "good", checkpoint_every=1, max_steps=2)
    with pytest.raises(NonFiniteLossError) as info:
        _run(tmp_path / "bad", pretext_cls=_nan_dino(2), checkpoint_every=1)
    message = str(info.value)
    assert isinstance(info.value, HistobenchError)
    assert "\n" not in message and "at step 2" in message and "nan" in message
    assert str(tmp_path / "bad" / CHECKPOINT) in message
    kept = torch.load(tmp_path / "bad" / CHECKPOINT, weights_only=False)
    ref = torch.load(tmp_path / "good" / CHECKPOINT, weights_only=False)
    assert kept["step"] == 2 and len(kept["history"]) == 2
    for name, t in ref["pretext"]["student"].items():  # the NaN step never touched the weights
        assert torch.equal(kept["pretext"]["student"][name], t), name
    assert all(torch.isfinite(t).all() for t in kept["pretext"]["teacher"].values())
    assert _losses(good) == pytest.approx([h["loss"] for h in kept["history"]])


def test_non_finite_loss_at_the_first_step_says_no_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match="at step 0 .*no checkpoint was written yet"):
        _run(tmp_path, pretext_cls=_nan_dino(0), checkpoint_every=1)
    assert not (tmp_path / CHECKPOINT).exists()


class _OOMInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _oom_dino(where: str):
    from histobench_dino.pretext import DINO

    class OOMDINO(DINO):
        def training_step(self, batch, step):
            if where == "forward":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            out = super().training_step(batch, step)
            out["loss"] = _OOMInBackward.apply(out["loss"])
            return out

    return OOMDINO


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_cuda_oom_names_the_batch_size(tmp_path, where):
    with pytest.raises(HistobenchError) as info:
        _run(tmp_path, pretext_cls=_oom_dino(where))
    message = str(info.value)
    assert f"{where} pass" in message and "train.batch_size=4" in message and "train.batch_size=2" in message
    assert "\n" not in message


class _RecordingReporter(Reporter):
    def __init__(self):
        super().__init__()
        self.stages = []

    def stage(self, description, total=None, unit="it"):
        self.stages.append({"description": description, "total": total, "unit": unit, "advanced": 0})
        return super().stage(description, total, unit)

    def _advance(self, stage, n):
        self.stages[-1]["advanced"] += n


class _Tracker:
    def __init__(self):
        self.rows = []

    def metrics(self, values, step=None):
        self.rows.append((step, dict(values)))


def test_progress_counts_images_and_tracker_gets_throughput(tmp_path):
    rep, tracker = _RecordingReporter(), _Tracker()
    _run(tmp_path, reporter=rep, tracker=tracker, max_steps=2)
    stage = rep.stages[-1]
    assert stage["unit"] == "img" and stage["total"] == 2 * BATCH and stage["advanced"] == 2 * BATCH
    keys = set().union(*(r[1] for r in tracker.rows))
    assert {"train/loss", "train/images_per_second", "epoch/images_per_second", "epoch/loss"} <= keys
    # After a resume the bar spans the remaining images only (its rate and ETA are this session's).
    rep2 = _RecordingReporter()
    res = _run(tmp_path, reporter=rep2, max_steps=4)
    assert res.resumed_from == 2
    assert rep2.stages[-1]["total"] == 2 * BATCH and rep2.stages[-1]["advanced"] == 2 * BATCH
    assert "from step 2" in rep2.stages[-1]["description"]


@pytest.mark.slow
def test_compile_option_trains_on_cpu(tmp_path):
    """``train.compile`` compiles the encoder in place (inductor; about a minute of compilation on a CPU)."""
    res = _run(tmp_path, compile=True, max_steps=2)
    assert len(res.history) == 2 and all(np.isfinite(_losses(res)))
    assert not any(k.startswith("_orig_mod") for k in res.encoder.state_dict())


def test_resume_loads_only_tensors_and_plain_data(tmp_path):
    """A checkpoint is never unpickled as code: one holding an arbitrary object is ignored (training starts over)."""
    import torch

    from histobench.pretrain.trainer import _load_checkpoint
    from histobench.reporting import Reporter

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    bad = tmp_path / "checkpoint.pt"
    torch.save({"step": 1, "total_steps": 3, "pretext": Payload()}, bad)
    warnings = []
    rep = Reporter()
    rep.warn = warnings.append
    assert _load_checkpoint(bad, torch.device("cpu"), rep) is None
    assert "cannot be read as tensors and plain data" in warnings[0]
    good = tmp_path / "good.pt"
    torch.save({"step": 2, "total_steps": 3, "pretext": {"w": torch.ones(2)}, "history": [{"loss": 1.0}]}, good)
    assert _load_checkpoint(good, torch.device("cpu"), rep)["step"] == 2
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert _load_checkpoint(tmp_path / "junk.pt", torch.device("cpu"), rep) is None
