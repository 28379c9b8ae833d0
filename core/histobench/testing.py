"""Contract checks and fixtures for plugin authors (and for histobench's own suite).

Each ``check_*`` builds a component with its ``demo`` preset on tiny synthetic data on the CPU and asserts
the contract of :mod:`histobench.components`; a failing check raises ``AssertionError`` naming what broke.
Use them in a plugin's own tests::

    from histobench.testing import check_pretext
    def test_contract(): check_pretext("my-pretext")
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from histobench.components import Aggregator, Encoder, Pretext, Task
from histobench.registry import create


@contextmanager
def registered(plugin: object, name: str) -> Iterator[object]:
    """Register ``plugin`` (an object or module with ``@hookimpl`` functions) for the duration of a block."""
    from histobench.plugins import load_plugins

    pm = load_plugins()
    pm.register(plugin, name=name)
    try:
        yield plugin
    finally:
        pm.unregister(name=name)


def tiny_bags(n_bags: int = 24, dim: int = 16, n_classes: int = 2, seed: int = 0, signal: float = 3.0):
    """Bags of random tile features; a class-specific direction is planted in 20 % of each bag's tiles."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_bags) % n_classes
    directions = rng.normal(size=(n_classes, dim))
    bags = []
    for y in labels:
        n = int(rng.integers(8, 40))
        x = rng.normal(size=(n, dim)).astype(np.float32)
        k = max(1, n // 5)
        x[:k] += signal * directions[y]
        bags.append(x)
    return bags, labels


def _tiny_images(n: int, size: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def check_encoder(name: str, options: dict[str, Any] | None = None) -> None:
    """Shapes, ``embed_dim``, finite outputs, gradients reach every trainable parameter group."""
    import torch

    enc = create("encoder", name, options, preset="demo")
    assert isinstance(enc, Encoder)
    module = enc.build()
    assert isinstance(getattr(module, "embed_dim", None), int) and module.embed_dim > 0, "encoder module needs an int embed_dim"
    if enc.input_kind == "pixels":
        t = enc.transform()
        x = torch.randn(3, 3, t.size, t.size)
    else:
        x = torch.randn(3, getattr(module, "in_dim", 8), 8, 8)
    out = module(x)
    assert out.shape == (3, module.embed_dim), f"forward gave {tuple(out.shape)}, expected (3, {module.embed_dim})"
    assert torch.isfinite(out).all(), "encoder output is not finite"
    out.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), "no gradient reaches the encoder"
    if hasattr(module, "forward_tokens"):
        tokens = module.forward_tokens(x)
        assert tokens.ndim == 3 and tokens.shape[0] == 3 and tokens.shape[-1] == module.embed_dim


def check_pretext(name: str, encoder: str | None = None, steps: int = 3, options: dict[str, Any] | None = None) -> list[float]:
    """CPU steps through the one training loop, with the ``demo`` presets on random data.

    Tile pretexts train on random uint8 tiles with the ``timm`` encoder; region pretexts (``requires``
    contains ``regions``) on random patch-embedding grids with the first registered ``grid`` encoder.
    Asserts finite losses; that training changes the exported encoder; that ``trained_encoder()`` maps
    inputs to ``[B, D]``; and exact resume: stopping after one step and resuming from the checkpoint
    (``state_dict`` / ``load_state_dict``) repeats the uninterrupted loss sequence. Returns the losses.
    """
    import tempfile

    import torch

    from histobench.features.cache import weights_hash
    from histobench.pretrain.data import SyntheticGridDataset, SyntheticTileDataset
    from histobench.pretrain.trainer import pretrain
    from histobench.registry import get_component, get_components

    regions = "regions" in get_component("pretext", name).cls.requires
    if encoder is None:
        grid_encoders = [n for n, e in sorted(get_components("encoder").items()) if e.cls.input_kind == "grid"]
        assert not regions or grid_encoders, f"pretext {name!r} needs regions but no grid encoder is registered"
        encoder = grid_encoders[0] if regions else "timm"

    def sample_input(enc, n: int, seed: int = 0):
        size = enc.transform().size
        g = torch.Generator().manual_seed(seed)
        if enc.input_kind == "grid":
            return torch.randn(n, enc.build().in_dim, size, size, generator=g)
        return torch.randn(n, 3, size, size, generator=g)

    def one_run(out_dir: Path, max_steps: int | None = None):
        pre = create("pretext", name, options, preset="demo")
        enc = create("encoder", encoder, None, preset="demo")
        assert isinstance(pre, Pretext)
        train = type(pre).train_options("demo", epochs=1, batch_size=8, num_workers=0, steps_per_epoch=steps,
                                        warmup_epochs=0, checkpoint_every=1)
        size = enc.transform().size
        if enc.input_kind == "grid":
            data = SyntheticGridDataset(8 * steps, enc.build().in_dim, size, seed=0)
        else:
            data = SyntheticTileDataset(8 * steps, size, seed=0)
        return enc, pretrain(pre, enc, data, train, out_dir=out_dir, seed=0, device="cpu", max_steps=max_steps)

    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        enc, full = one_run(Path(a))
        losses = [h["loss"] for h in full.history]
        assert len(losses) == steps, f"expected {steps} steps, got {len(losses)}"
        assert all(math.isfinite(v) for v in losses), f"non-finite loss: {losses}"
        torch.manual_seed(0)
        assert weights_hash(full.encoder) != weights_hash(enc.build()), "training did not change the encoder"
        out = full.encoder(sample_input(enc, 2))
        assert out.ndim == 2 and out.shape[0] == 2, "trained_encoder() must map inputs to [B, D]"
        _, part = one_run(Path(b), max_steps=1)
        assert part.steps == 1
        _, resumed = one_run(Path(b))
        assert resumed.resumed_from == 1, "the checkpoint was not resumed"
        again = [h["loss"] for h in resumed.history]
        assert np.allclose(again, losses, rtol=1e-5, atol=1e-6), f"resume changed the losses: {again} vs {losses}"
    return losses


def check_aggregator(name: str, options: dict[str, Any] | None = None, dim: int = 16, n_outputs: int = 3) -> None:
    """Output and attention shapes, attention over real tiles sums to 1, padding does not change the output."""
    import torch

    agg = create("aggregator", name, options, preset="demo")
    assert isinstance(agg, Aggregator)
    module = agg.build(dim, n_outputs).eval()
    x = torch.randn(2, 10, dim)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    out, att = module(x, mask)
    assert out.shape == (2, n_outputs), f"output {tuple(out.shape)}, expected (2, {n_outputs})"
    if att is not None:
        assert att.shape == (2, 10)
        assert torch.allclose(att.sum(1), torch.ones(2), atol=1e-5), "attention over real tiles must sum to 1"
        assert att[1, 6:].abs().max() == 0, "padded tiles got attention"
    x2 = x.clone()
    x2[1, 6:] = 1e3  # garbage in the padding
    out2, _ = module(x2, mask)
    assert torch.allclose(out, out2, atol=1e-5), "padding changed the output"


def check_task(name: str, tmp_dir: Path) -> Any:
    """The demo cohort: required columns, every class present, several slides for some patients; returns it."""
    task = create("task", name, None, preset="demo")
    assert isinstance(task, Task)
    df = task.demo_cohort(Path(tmp_dir), seed=0)
    for col in ("slide_id", "case_id", "path"):
        assert col in df.columns, f"demo manifest lacks {col}"
    assert df["slide_id"].is_unique
    if task.task_kind in ("subtyping", "grading"):
        assert set(df["label"]) <= set(task.classes) and len(set(df["label"])) == len(task.classes), "demo lacks a class"
    assert (df.groupby("case_id").size() > 1).any(), "no patient has several slides"
    assert all(Path(p).exists() for p in df["path"]), "demo manifest points at missing files"
    assert task.primary_metric in task.metrics
    return df
