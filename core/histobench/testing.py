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
        _check_tokens(module, x)


def _check_tokens(module: Any, x: Any) -> None:
    """``forward_tokens`` with ``num_prefix_tokens`` (and ``token_grid``); ``cls_attention`` rows sum to 1."""
    import torch

    from histobench.errors import HistobenchError

    with torch.no_grad():
        tokens = module.forward_tokens(x)
        b = x.shape[0]
        assert tokens.ndim == 3 and tokens.shape[0] == b and tokens.shape[-1] == module.embed_dim, \
            f"forward_tokens gave {tuple(tokens.shape)}, expected ({b}, T, {module.embed_dim})"
        prefix = getattr(module, "num_prefix_tokens", None)
        assert isinstance(prefix, int) and 0 <= prefix < tokens.shape[1], \
            "an encoder with forward_tokens needs an int num_prefix_tokens (class and register tokens, which come first)"
        if hasattr(module, "token_grid"):
            h, w = module.token_grid(x)
            assert tokens.shape[1] == prefix + h * w, \
                f"forward_tokens gave {tokens.shape[1]} tokens, expected {prefix} prefix + {h}x{w} patches"
        if not hasattr(module, "cls_attention"):
            return
        try:
            att = module.cls_attention(x)
        except HistobenchError:  # an architecture without [CLS] attention (a CNN) says so
            return
        n = tokens.shape[1] - prefix
        assert att.ndim == 3 and att.shape[0] == b and att.shape[2] == n, \
            f"cls_attention gave {tuple(att.shape)}, expected ({b}, heads, {n})"
        assert (att >= 0).all() and torch.allclose(att.sum(-1), torch.ones_like(att[..., 0]), atol=1e-5), \
            "cls_attention rows must sum to 1 over the patch tokens"


class SyntheticMaskedTiles:
    """Random uint8 tiles with random nuclei maps (a few disks per tile, types 1-3): items are dicts with
    ``images``, ``instances``, ``types``, ``slide_index`` and ``tile_index`` (the ``masks`` batch contract)."""

    def __init__(self, tiles: Any, seed: int = 0):
        self.tiles = tiles
        self.slide_index, self.tile_index = tiles.slide_index, tiles.tile_index
        rng = np.random.default_rng(seed)
        n, size = len(tiles), tiles.array.shape[-1]
        yy, xx = np.mgrid[:size, :size]
        self.instances = np.zeros((n, size, size), np.uint16)
        self.types = np.zeros((n, size, size), np.uint8)
        for i in range(n):
            for k in range(1, int(rng.integers(2, 6)) + 1):
                cy, cx, r = rng.uniform(0, size, 2).tolist() + [float(rng.uniform(2, max(size / 8, 3)))]
                disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                self.instances[i][disk] = k
                self.types[i][disk] = 1 + k % 3

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, idx: int):
        import torch

        x, s, t = self.tiles[idx]
        return {"images": x, "slide_index": s, "tile_index": t,
                "instances": torch.from_numpy(self.instances[idx].astype(np.int32)),
                "types": torch.from_numpy(self.types[idx])}


def synthetic_pretrain_data(requires: frozenset[str], encoder: Any, n_items: int, seed: int = 0):
    """A tiny dataset and cohort that meet ``requires`` for ``encoder`` (an :class:`Encoder` component).

    Tiles (random uint8) or region grids (random floats); with ``masks`` random nuclei maps join every item;
    with ``hierarchy`` the items belong to several patients with one to three slides each, one patient with a
    single slide and one slide with a single tile (the wrap-around cases). Returns ``(dataset, CohortMeta)``.
    """
    from histobench.components import CohortMeta
    from histobench.pretrain.data import SyntheticGridDataset, SyntheticTileDataset

    size = encoder.transform().size
    if "regions" in requires:
        data = SyntheticGridDataset(n_items, encoder.build().in_dim, size, seed=seed)
        return data, CohortMeta.one_patient_per_slide(int(data.slide_index.max()) + 1)
    data = SyntheticTileDataset(n_items, size, seed=seed)
    cohort = CohortMeta.one_patient_per_slide(int(data.slide_index.max()) + 1)
    if "hierarchy" in requires:
        # slide 0 holds a single tile; patients own 1, 2, 3, 1, 2, 3, ... slides in turn
        n_slides = max(2, n_items // 3)
        slide_index = np.concatenate([[0], 1 + np.arange(n_items - 1) % (n_slides - 1)]).astype(np.int64)
        data.slide_index = slide_index
        data.tile_index = np.array([np.sum(slide_index[:i] == s) for i, s in enumerate(slide_index)], np.int64)
        patients, slide = [], 0
        while slide < n_slides:
            take = 1 + len(patients) % 3
            patients += [f"patient-{len(set(patients))}"] * min(take, n_slides - slide)
            slide += take
        cohort = CohortMeta(tuple(f"slide-{i}" for i in range(n_slides)), tuple(patients[:n_slides]))
    if "masks" in requires:
        data = SyntheticMaskedTiles(data, seed=seed)
    return data, cohort


def check_pretext(name: str, encoder: str | None = None, steps: int = 3, options: dict[str, Any] | None = None) -> list[float]:
    """CPU steps through the one training loop, with the ``demo`` presets, on synthetic data built from what
    the pretext ``requires`` (:func:`synthetic_pretrain_data`; the ``hashing`` text encoder for ``text``).

    Tile pretexts train with the ``timm`` encoder, region pretexts (``regions``) with the first registered
    ``grid`` encoder. Asserts that every batch meets the contract of what the pretext declared (the input key,
    ``slide_index``/``tile_index``/``patient_index``; pixel-aligned ``instances`` and ``types`` for ``masks``;
    whole patients for ``hierarchy``); finite losses; that training changes the exported encoder; that
    ``trained_encoder()`` maps inputs to ``[B, D]``; and exact resume: stopping after one step and resuming from
    the checkpoint (``state_dict`` / ``load_state_dict``) repeats the uninterrupted loss sequence. Returns the
    losses.
    """
    import tempfile

    import torch

    from histobench.features.cache import weights_hash
    from histobench.pretrain.trainer import pretrain
    from histobench.registry import get_component, get_components

    requires = get_component("pretext", name).cls.requires
    regions = "regions" in requires
    if encoder is None:
        grid_encoders = [n for n, e in sorted(get_components("encoder").items()) if e.cls.input_kind == "grid"]
        assert not regions or grid_encoders, f"pretext {name!r} needs regions but no grid encoder is registered"
        encoder = grid_encoders[0] if regions else "timm"
    hierarchy = "hierarchy" in requires
    batch_size = 2 if hierarchy else 8  # patients per step for hierarchy batches, tiles otherwise
    seen: list[dict[str, Any]] = []

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
        step_fn = pre.training_step

        def recording_step(batch, step):
            seen.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
            return step_fn(batch, step)

        pre.training_step = recording_step
        train = type(pre).train_options("demo", epochs=1, batch_size=batch_size, num_workers=0, steps_per_epoch=steps,
                                        warmup_epochs=0, checkpoint_every=1)
        data, cohort = synthetic_pretrain_data(requires, enc, (3 if hierarchy else 1) * 8 * steps, seed=0)
        text = create("text_encoder", "hashing") if "text" in requires else None
        return enc, pretrain(pre, enc, data, train, out_dir=out_dir, seed=0, device="cpu", max_steps=max_steps,
                             cohort=cohort, text_encoder=text,
                             segmentation={"identity": "synthetic-disks", "types": {1: "a", 2: "b", 3: "c"}})

    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        enc, full = one_run(Path(a))
        losses = [h["loss"] for h in full.history]
        assert len(losses) == steps, f"expected {steps} steps, got {len(losses)}"
        assert all(math.isfinite(v) for v in losses), f"non-finite loss: {losses}"
        _check_batches(seen, requires, "grids" if regions else "images", pre_hierarchy=create(
            "pretext", name, options, preset="demo").hierarchy_shape() if hierarchy else None)
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


def _check_batches(batches: list[dict[str, Any]], requires: frozenset[str], input_key: str,
                   pre_hierarchy: tuple[int, int] | None) -> None:
    """The batch contract of :class:`~histobench.components.Pretext` for what ``requires`` declares."""
    assert batches, "the pretext saw no batch"
    for batch in batches:
        for key in (input_key, "slide_index", "tile_index", "patient_index"):
            assert key in batch, f"batch lacks {key!r} (has {sorted(batch)})"
        x = batch[input_key]
        assert len(batch["slide_index"]) == len(batch["patient_index"]) == len(x)
        if "masks" in requires:
            for key in ("instances", "types"):
                assert key in batch, f"a pretext that requires masks got no {key!r}"
                assert tuple(batch[key].shape) == (x.shape[0], *x.shape[-2:]), (
                    f"{key} {tuple(batch[key].shape)} is not pixel-aligned with {input_key} {tuple(x.shape)}")
            assert not batch["instances"].is_floating_point(), "instances must be integer ids"
        if pre_hierarchy is not None:
            per_patient = pre_hierarchy[0] * pre_hierarchy[1]
            assert len(x) % per_patient == 0, f"hierarchy batch of {len(x)} is not whole patients of {per_patient}"
            groups = batch["patient_index"].view(-1, per_patient)
            assert (groups == groups[:, :1]).all(), "a patient's group in a hierarchy batch mixes patients"


def check_text_encoder(name: str, options: dict[str, Any] | None = None) -> None:
    """``dim``, ``identity()``, unit rows of width ``dim``, determinism, identical texts give identical rows."""
    import torch

    from histobench.components import TextEncoder

    enc = create("text_encoder", name, options, preset="demo")
    assert isinstance(enc, TextEncoder)
    assert isinstance(enc.dim, int) and enc.dim > 0, "a text encoder needs an int dim"
    assert isinstance(enc.identity(), str) and enc.identity(), "identity() must be a non-empty string"
    texts = ["Nuclear pleomorphism is evident.", "Dense lymphocytic infiltrate.", "Nuclear pleomorphism is evident."]
    out = enc.encode(texts)
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (3, enc.dim), f"encode gave {tuple(out.shape)}"
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-4), "rows must have unit norm"
    assert torch.allclose(out[0], out[2], atol=1e-6), "identical texts must give identical rows"
    assert not torch.allclose(out[0], out[1]), "different texts gave the same row"
    assert torch.allclose(enc.encode(texts[:1]), out[:1], atol=1e-6), "encode is not deterministic"
    if enc.max_tokens is not None:
        assert enc.count_tokens(texts[0]) <= enc.max_tokens


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


def _segment_twice(path: str, options: dict[str, Any], tile: np.ndarray, ref: Any) -> list:
    """Build a segmenter from its class path, ``setup()``, and segment ``tile`` twice (run in a spawned process
    for ``own_process`` segmenters)."""
    from histobench.segment.runner import load_class

    seg = load_class(path)(options)
    seg.setup()
    return [seg.segment(tile.copy(), ref) for _ in range(2)]


def check_segmenter(name: str, options: dict[str, Any] | None = None, size: int = 96) -> tuple[Any, Any]:
    """A segmenter on a tile of a tiny synthetic slide (which has a nuclei sidecar, for the ``oracle``).

    ``setup()`` runs first; in a fresh spawned process when the segmenter is ``own_process``. Asserts: instances
    are an integer ``size`` x ``size`` map with 0 as background and labels in 0..65535 (what the cache stores);
    types, when given, an integer map of the same shape; the same input gives the same maps. Returns
    ``(instances, types)``.
    """
    import tempfile

    from histobench.components import Segmenter, TileRef
    from histobench.segment.runner import check_maps, class_path
    from histobench.slides.reader import open_slide
    from histobench.slides.synthetic import write_synthetic_slide

    seg = create("segmenter", name, options, preset="demo")
    assert isinstance(seg, Segmenter)
    assert seg.identity() == create("segmenter", name, options, preset="demo").identity(), "identity() is not stable"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "check.tiff"
        write_synthetic_slide(path, class_index=0, n_classes=2, seed=3, size=(256, 256), mpp=0.5, signal_fraction=0.6)
        x = y = 64
        with open_slide(path) as slide:
            tile = slide.read_region(x, y, 0, size, size)
        ref = TileRef(slide_id="check", path=path, x=x, y=y, level=0, read_size=size, tile_size=size, mpp=0.5)
        cls_path, opts = class_path(type(seg)), seg.options.model_dump(mode="json")
        if type(seg).own_process:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                runs = pool.submit(_segment_twice, cls_path, opts, tile, ref).result()
        else:
            runs = _segment_twice(cls_path, opts, tile, ref)
    (inst, types), (inst2, types2) = runs
    inst_arr = np.asarray(inst)
    assert inst_arr.shape == (size, size), f"instances {inst_arr.shape}, expected ({size}, {size})"
    assert np.issubdtype(inst_arr.dtype, np.integer), f"instances are {inst_arr.dtype}, not integer labels"
    check_maps(inst, types, size)  # 0..65535 labels, types of the same shape in 0..255
    assert (inst_arr == 0).any(), "no background (0) pixel on a tile with stroma"
    assert np.array_equal(inst_arr, np.asarray(inst2)), "instances differ between two runs on the same tile"
    assert (types is None) == (types2 is None) and (types is None or np.array_equal(types, types2)), \
        "types differ between two runs on the same tile"
    return inst, types
