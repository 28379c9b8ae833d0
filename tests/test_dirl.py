"""DiRL-R: the spec's CPU fidelity checks (``/work/shared/methods/dirl.md`` §7), numbered as there.

Checks 7 and 8 (attention de-sparsification, grouping ablation order) compare attention metrics and are not
here (see the plugin README). The oracle data is a small synthetic demo cohort segmented by the ``oracle``
(true nuclei: 1 tumour, 2 lymphocyte, 3 fibroblast); DiRL and DINO are trained once on it, with the same seed,
data and epochs, and shared by the checks (module-scoped fixtures).
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from histobench.components import PretrainContext  # noqa: E402
from histobench.errors import HistobenchError  # noqa: E402
from histobench.registry import create  # noqa: E402
from histobench.ssl.losses import DINOLoss  # noqa: E402
from histobench_dirl import grouping as G  # noqa: E402
from histobench_dirl.loss import DenseLoss, pool_groups  # noqa: E402
from histobench_dirl.pretext import DiRL, cls_and_patches  # noqa: E402
from histobench_dirl.views import DiRLViews, occupancy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

EPOCHS = 10
DEMO_TASK = {"demo_patients": 8, "demo_slide_px": 1536}


def quiet():
    from histobench.reporting import Reporter

    return Reporter()  # silent


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """A small synthetic cohort: tiles, the oracle's segmentation cache and the masked tile dataset."""
    from histobench.pipeline.stages import tile_cohort
    from histobench.pretrain.data import SlideTileDataset, cache_masks, cache_uint8
    from histobench.segment import segment_cohort

    tmp = tmp_path_factory.mktemp("dirl")
    rep = quiet()
    task = create("task", "tcga-nsclc", DEMO_TASK, preset="demo")
    manifest = task.demo_cohort(tmp / "demo", seed=0)
    slides = tile_cohort(manifest, task, tmp / "work", rep)
    seg = segment_cohort(create("segmenter", "oracle"), slides, tmp / "work", rep)
    tiles = cache_uint8(SlideTileDataset(slides), tmp / "work" / "tiles.npy", rep)
    data = cache_masks(tiles, slides, seg, tmp / "work" / "masks", rep)
    return {"tmp": tmp, "task": task, "manifest": manifest, "slides": slides, "seg": seg, "data": data,
            "slide_ids": tuple(s.slide_id for s in slides)}


def train(name, data, slide_ids, seg, options, epochs=EPOCHS, seed=0):
    """``pretrain`` through the one loop on the oracle data; returns (PretrainResult, pretext)."""
    import tempfile
    from pathlib import Path

    from histobench.components import CohortMeta
    from histobench.pretrain.trainer import pretrain

    pre = create("pretext", name, options, preset="demo")
    enc = create("encoder", "timm", None, preset="demo")
    train_opts = type(pre).train_options("demo", epochs=epochs, batch_size=32, num_workers=0)
    with tempfile.TemporaryDirectory() as out:
        res = pretrain(pre, enc, data, train_opts, out_dir=Path(out), seed=seed, device="cpu", reporter=quiet(),
                       cohort=CohortMeta(slide_ids, slide_ids),
                       segmentation={"identity": seg.identity, **seg.info})
    return res, pre


@pytest.fixture(scope="module")
def trained(oracle):
    """DiRL (true types) and DINO, both trained EPOCHS epochs on the same tiles with the same seed."""
    o = oracle
    dirl = train("dirl", o["data"], o["slide_ids"], o["seg"], {})
    dino = train("dino", o["data"], o["slide_ids"], o["seg"], {"n_local_crops": 0})
    return {"dirl": dirl, "dino": dino}


# ----------------------------------------------------------------------------- 1. mask geometry


def test_1_joint_views_give_each_mask_pixel_the_group_of_its_source_pixel():
    """An image whose channels encode (row, col): after the joint augmentation every mask pixel holds the group
    of the source pixel decoded from the image (100%, flips and 90° rotations included), global and local crops."""
    opts = DiRL.Options(global_crop_size=40, local_crop_size=16, n_local_crops=3, color_jitter_p=0.0, grayscale_p=0.0,
                        global_blur_p=(0.0,), local_blur_p=0.0, rotations=True)
    views = DiRLViews(opts, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    b, h, w = 16, 48, 56
    rows = torch.arange(h, dtype=torch.float32).view(1, h, 1).expand(b, h, w) / (h - 1)
    cols = torch.arange(w, dtype=torch.float32).view(1, 1, w).expand(b, h, w) / (w - 1)
    image = torch.stack([rows, cols, torch.zeros_like(rows)], 1)
    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 5, (b, h, w), generator=g)  # a different group almost every pixel: no slack
    out, masks = views(image, groups, torch.Generator().manual_seed(1))
    assert len(out) == len(masks) == 5
    poses = set()
    for v, m in zip(out, masks):
        assert m.dtype == torch.long and m.shape == v.shape[:1] + v.shape[2:]
        r = (v[:, 0] * (h - 1)).round().long()
        c = (v[:, 1] * (w - 1)).round().long()
        assert r.min() >= 0 and r.max() < h and c.min() >= 0 and c.max() < w
        expected = groups[torch.arange(b).view(-1, 1, 1), r, c]
        assert torch.equal(m, expected), f"{(m != expected).float().mean():.4f} of mask pixels disagree"
        # which of the 8 dihedral poses: the direction in which row/col grow along the output's x axis
        dr, dc = (v[:, 0, :, -1] - v[:, 0, :, 0]).mean(1), (v[:, 1, :, -1] - v[:, 1, :, 0]).mean(1)
        dr2 = (v[:, 0, -1, :] - v[:, 0, 0, :]).mean(1)
        poses |= {(int(torch.sign(a)), int(torch.sign(c_)), int(torch.sign(d))) for a, c_, d in zip(dr, dc, dr2)}
    assert len(poses) >= 6, f"flips and rotations were not all drawn: {poses}"


def test_1_masks_are_never_colour_augmented():
    opts = DiRL.Options(global_crop_size=32, n_local_crops=0)  # full photometric recipe on
    views = DiRLViews(opts, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    groups = torch.randint(0, 4, (8, 32, 32), generator=g)
    _, masks = views(images, groups, torch.Generator().manual_seed(2))
    for m in masks:
        assert set(m.unique().tolist()) <= {0, 1, 2, 3}


def test_1_views_draw_what_dinos_views_draw():
    """With DINO's recipe the images are DINO's views bit for bit, masks or not (same random numbers)."""
    from histobench_dino.pretext import DINO
    from histobench_dino.views import DINOViews

    dino_opts = DINO.Options(global_crop_size=32, local_crop_size=16, n_local_crops=2)
    opts = DiRL.Options(global_crop_size=32, local_crop_size=16, n_local_crops=2, color_jitter=(0.4, 0.4, 0.2, 0.1),
                        global_blur_p=(1.0, 0.1), global_solarize_p=(0.0, 0.2))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = DINOViews(dino_opts, mean, std)(images, torch.Generator().manual_seed(5))
    ours, _ = DiRLViews(opts, mean, std)(images, torch.zeros(6, 40, 40, dtype=torch.long), torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(ref, ours))


# ------------------------------------------------------------------------------------ 2. occupancy


def test_2_occupancy_partitions_every_token():
    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 4, (5, 64, 64), generator=g)
    a = occupancy(groups, 4, (8, 8))
    assert a.shape == (5, 4, 64)
    assert torch.allclose(a.sum(1), torch.ones(5, 64), atol=1e-6)
    # the area average of one token by hand
    tok = groups[2, 8:16, 16:24]
    assert torch.allclose(a[2, :, 1 * 8 + 2], torch.bincount(tok.flatten(), minlength=4).float() / 64)


def test_2_token_aligned_mask_pools_to_the_plain_mean_of_its_tokens():
    groups = torch.zeros(1, 64, 64, dtype=torch.long)
    picked = [(1, 2), (3, 3), (6, 0), (7, 7)]
    for r, c in picked:
        groups[0, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 1
    a = occupancy(groups, 2, (8, 8))
    tokens = torch.randn(1, 64, 96, dtype=torch.float64)
    z, mass = pool_groups(tokens, a, eps=0.0)
    idx = [r * 8 + c for r, c in picked]
    assert float(mass[0, 1]) == 4.0 and float(mass[0, 0]) == 60.0
    assert torch.allclose(z[0, 1], tokens[0, idx].mean(0), atol=1e-6)
    assert torch.allclose(z[0, 0], tokens[0, [t for t in range(64) if t not in idx]].mean(0), atol=1e-6)


# ------------------------------------------------------------------------------ 3. reduction to DINO


def test_3_lambda_zero_is_the_dino_plugin_bit_for_bit():
    """3 steps through the one loop, same seed and data: losses and every parameter equal DINO's exactly."""
    import tempfile
    from pathlib import Path

    from histobench.pretrain.trainer import pretrain
    from histobench.testing import synthetic_pretrain_data

    enc = create("encoder", "timm", None, preset="demo")
    data, cohort = synthetic_pretrain_data(frozenset({"tiles", "masks"}), enc, 24, seed=0)
    same = {"n_local_crops": 2, "local_crop_size": 32, "momentum_teacher": 0.996}
    dirl_only = {"dense_lambda": 0.0, "color_jitter": (0.4, 0.4, 0.2, 0.1), "global_blur_p": (1.0, 0.1),
                 "global_solarize_p": (0.0, 0.2), "local_blur_p": 0.5}
    results = {}
    for name, opts in (("dino", same), ("dirl", {**same, **dirl_only})):
        pre = create("pretext", name, opts, preset="demo")
        t = type(pre).train_options("demo", epochs=1, batch_size=8, num_workers=0, warmup_epochs=0, lr=1e-3)
        with tempfile.TemporaryDirectory() as out:
            res = pretrain(pre, create("encoder", "timm", None, preset="demo"), data, t, out_dir=Path(out), seed=3,
                           device="cpu", reporter=quiet(), cohort=cohort, segmentation={"identity": "disks"})
        results[name] = (res, pre)
    (dino, dpre), (dirl, rpre) = results["dino"], results["dirl"]
    assert len(dino.history) == len(dirl.history) == 3
    assert [h["loss"] for h in dino.history] == [h["loss"] for h in dirl.history]
    assert [h["loss"] for h in dirl.history] == [h["loss_img"] for h in dirl.history]
    for part in ("student", "teacher"):
        a, b = getattr(dpre, part).state_dict(), getattr(rpre, part).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{part} parameters differ"
    assert torch.equal(dpre.loss.center, rpre.loss.center)


# ---------------------------------------------------------------------------- 4. dense term uses K


def test_4_k_equal_1_is_a_dino_loss_on_mean_pooled_patch_tokens():
    torch.manual_seed(0)
    head = create("pretext", "dirl", None, preset="demo")
    from histobench.ssl.heads import DINOProjectionHead

    h = DINOProjectionHead(16, 32, 24, 8)
    s_tok = [torch.randn(4, 9, 16) for _ in range(2)]
    t_tok = [torch.randn(4, 9, 16) for _ in range(2)]
    occ = torch.ones(4, 1, 9)  # K = 1: an all-ones mask
    s_z, masses = zip(*[pool_groups(t, occ) for t in s_tok])
    t_z = [pool_groups(t, occ)[0] for t in t_tok]
    dense = DenseLoss(32, 0.1, 0.9, a_min=1.0)
    loss, stats = dense(list(s_z), t_z, list(masses), h, h, 0.04)
    ref = DINOLoss(32, 0.1, 0.9)
    expected, _ = ref([h(t.mean(1)) for t in s_tok], [h(t.mean(1)) for t in t_tok], 0.04)
    assert stats["valid_terms"] == 2 * 4 and stats["valid_groups"] == 1.0
    assert torch.allclose(loss, expected, atol=1e-5), (float(loss), float(expected))
    assert torch.allclose(dense.center, ref.center, atol=1e-6)
    assert head.Options().dense_lambda == 1.0


def test_4_a_group_missing_from_one_view_adds_no_term_and_no_nan():
    from histobench.ssl.heads import DINOProjectionHead

    torch.manual_seed(1)
    h = DINOProjectionHead(8, 16, 12, 4)
    occ1 = torch.zeros(2, 3, 4)
    occ2 = torch.zeros(2, 3, 4)
    occ1[:, 0], occ2[:, 0] = 1.0, 1.0  # group 0 everywhere in both views
    occ1[0, 0, :2], occ1[0, 2, :2] = 0.0, 1.0  # group 2 (2 tokens) only in view 1 of sample 0
    toks = [torch.randn(2, 4, 8, requires_grad=True) for _ in range(2)]
    s = [pool_groups(t, a) for t, a in zip(toks, (occ1, occ2))]
    t = [pool_groups(x.detach(), a)[0] for x, a in zip(toks, (occ1, occ2))]
    dense = DenseLoss(16, a_min=1.0)
    loss, stats = dense([z for z, _ in s], t, [m for _, m in s], h, h, 0.04)
    assert stats["valid_terms"] == 2 * 2  # group 0 of both samples in both pairs; group 2 adds nothing
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(x.grad).all() for x in toks)
    # nothing valid at all: zero loss, no NaN, the centre unchanged
    empty = [torch.zeros(2, 3, 4)] * 2
    s = [pool_groups(x, a) for x, a in zip(toks, empty)]
    before = dense.center.clone()
    loss, stats = dense([z for z, _ in s], [z.detach() for z, _ in s], [m for _, m in s], h, h, 0.04)
    assert stats["valid_terms"] == 0 and float(loss) == 0.0 and torch.equal(dense.center, before)


def test_4_valid_groups_per_pair_on_oracle_data_lie_between_2_and_k(trained):
    res, pre = trained["dirl"]
    k = pre.n_groups
    assert k == 4
    groups = np.array([h["valid_groups"] for h in res.history])
    assert 2 <= groups.mean() <= k, groups.mean()
    assert (groups <= k).all()


# ---------------------------------------------------------------------------------- 5. optimisation


def epoch_means(history, key, steps_per_epoch):
    v = np.array([h[key] for h in history])
    return v[: len(v) // steps_per_epoch * steps_per_epoch].reshape(-1, steps_per_epoch).mean(1)


def test_5_both_losses_decrease_without_collapse(trained):
    res, pre = trained["dirl"]
    spe = res.steps // EPOCHS
    img, dense = epoch_means(res.history, "loss_img", spe), epoch_means(res.history, "loss_dense", spe)
    print("L_img per epoch", np.round(img, 3), "L_dense per epoch", np.round(dense, 3))
    assert img[-1] < img[0] and dense[-1] < dense[0]
    floor = 0.5 * math.log(pre.options.out_dim)
    ent = np.array([h["teacher_entropy"] for h in res.history])
    dent = np.array([h["dense_teacher_entropy"] for h in res.history])
    assert ent.min() > floor and dent.min() > 0.5 * math.log(pre.options.dense_out_dim), (ent.min(), dent.min())
    assert min(h["pooled_std"] for h in res.history) > 1e-3
