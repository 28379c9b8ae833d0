"""SLPD: the spec's CPU fidelity checks (``/work/shared/methods/slpd.md`` section 7), numbered as there."""

import copy
import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from histobench.components import PretrainContext  # noqa: E402
from histobench_slpd import clustering as C  # noqa: E402
from histobench_slpd.data import RegionGridDataset, synthetic_grid_cohort  # noqa: E402
from histobench_slpd.encoder import HIPTRegionEncoder  # noqa: E402
from histobench_slpd.loss import SLPDLoss  # noqa: E402
from histobench_slpd.pretext import SLPD  # noqa: E402
from histobench_slpd.views import SLPDGridViews, centre_crop  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


@pytest.fixture(scope="module")
def cohort():
    # 16 slides of 4..16 regions: some below the demo n_min of 8
    return synthetic_grid_cohort(n_slides=16, regions_per_slide=(4, 16), dim=96, grid=8, seed=0)


def make(seed=0, total_steps=40, steps_per_epoch=10, init_seed=None, **options):
    enc = HIPTRegionEncoder(HIPTRegionEncoder.preset("demo"))
    pre = SLPD(SLPD.preset("demo"), **options)
    torch.manual_seed(seed if init_seed is None else init_seed)
    ctx = PretrainContext(device=torch.device("cpu"), total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                          epochs=total_steps // steps_per_epoch, batch_size=8, encoder_component=enc, seed=seed)
    pre.setup(enc.build(), ctx)
    return pre


def batch_of(ds, rows):
    rows = torch.as_tensor(rows)
    return {"grids": ds.grids[rows], "slide_index": torch.as_tensor(ds.slide_index)[rows],
            "tile_index": torch.as_tensor(ds.region_index)[rows]}


def clustered(ds, **options):
    pre = make(**options)
    diag = pre.on_epoch_start(pre.options.warm_epoch + 1, ds)
    return pre, diag


# --------------------------------------------------------------------------------- 1. shapes, encoder


def test_encoder_contract_and_shapes():
    from histobench.testing import check_encoder

    check_encoder("hipt-vit4k")
    enc = HIPTRegionEncoder()  # paper defaults
    m = enc.build().eval()
    assert (m.in_dim, m.embed_dim, len(m.blocks), m.pos_embed.shape) == (384, 192, 6, (1, 1 + 14 * 14, 192))
    assert m.blocks[0].attn.qkv.bias is not None and m.blocks[0].norm1.eps == 1e-6
    assert isinstance(m.blocks[0].drop_path1, torch.nn.Identity) and m.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    for side in (16, 14, 6):
        assert m(torch.randn(2, 384, side, side)).shape == (2, 192)
    assert m.forward_tokens(torch.randn(2, 384, 16, 16)).shape == (2, 1 + 256, 192)
    assert torch.equal(m.position_embedding(14, 14), m.pos_embed)
    assert enc.transform().size == 16


def test_views_are_flipped_subgrids():
    g = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    views = SLPDGridViews()(g, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(2, 3, 14, 14)] * 2 + [(2, 3, 6, 6)] * 8
    for v in views:
        s = v.shape[-1]
        for b in range(2):
            windows = [g[b, :, i:i + s, j:j + s] for i in range(17 - s) for j in range(17 - s)]
            assert any(torch.equal(v[b], w) or torch.equal(v[b], w.flip(-1)) for w in windows)
    again = SLPDGridViews()(g, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    assert torch.equal(centre_crop(g, 14), g[..., 1:15, 1:15])


def test_step_logit_shapes(cohort):
    pre = make()
    b = batch_of(cohort, range(8))
    views = pre.views(b["grids"], pre._generator(0))
    out = pre.student.forward_views(views)
    assert len(out) == 2 + 4 and all(o.shape == (8, 1024) for o in out)
    assert set(pre.training_step(b, 0)) == {"loss", "loss_self", "loss_intra", "loss_inter", "teacher_entropy", "momentum"}


# ------------------------------------------------------------------------------------------ 2. warm-up


def test_warm_up_is_exactly_dino(cohort):
    pre = make()
    assert pre.on_epoch_start(pre.options.warm_epoch, cohort) is None and pre.clusters is None
    ref_loss = copy.deepcopy(pre.loss)
    b = batch_of(cohort, range(8))
    torch.manual_seed(7)
    out = pre.training_step(b, 3)
    torch.manual_seed(7)
    views = pre.views(b["grids"], pre._generator(3))
    with torch.no_grad():
        t = pre.teacher.forward_views(views[:2])
    ref, _ = ref_loss(pre.student.forward_views(views), t, 0.04)
    assert float(out["loss_intra"]) == 0.0 and float(out["loss_inter"]) == 0.0
    assert torch.equal(out["loss"], out["loss_self"]) and torch.equal(out["loss"], ref)
    assert torch.equal(pre.proto_loss.proto.center, torch.zeros_like(pre.proto_loss.proto.center))


# ------------------------------------------------------------------------------ 3-4. prototypes, k-means


def test_prototypes_eligibility_and_assignments(cohort):
    pre, diag = clustered(cohort)
    c = {k: v.numpy() if hasattr(v, "numpy") else v for k, v in pre.clusters.items()}
    counts = np.diff(cohort.offsets)
    eligible = counts >= 8
    assert 0 < eligible.sum() < len(counts)  # the cohort has slides on both sides of n_min
    assert np.array_equal(c["eligible"], eligible) and diag["eligible_slides"] == eligible.sum()
    assert diag["skipped_slides"] == (~eligible).sum()
    assert c["prototypes"].shape == (16, 3, 64)
    norms = np.linalg.norm(c["prototypes"], axis=-1)
    assert np.abs(norms[eligible] - 1).max() < 1e-5 and np.all(norms[~eligible] == 0)
    feats = pre.embed_regions(cohort).numpy()
    near_raw = near_unit = total = 0
    for s in range(16):
        lo, hi = cohort.offsets[s], cohort.offsets[s + 1]
        a = c["assignment"][lo:hi]
        if not eligible[s]:
            assert np.all(a == -1)
            continue
        assert set(a.tolist()) == {0, 1, 2}  # no empty cluster (n_min >= 2K)
        d = ((feats[lo:hi, None] - c["centroids"][s][None]) ** 2).sum(-1)
        near_raw += (d.argmin(1) == a).sum()
        near_unit += ((feats[lo:hi] @ c["prototypes"][s].T).argmax(1) == a).sum()
        total += hi - lo
    assert near_raw == total and near_unit >= 0.95 * total
    nbr = c["neighbours"][:, 0]
    assert np.all(nbr[~eligible] == -1) and np.all(eligible[nbr[eligible]]) and np.all(nbr[eligible] != np.nonzero(eligible)[0])


def test_kmeans_finds_planted_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 10
    x = np.concatenate([centres[i] + rng.normal(size=(20, 8)) for i in range(3)])
    c, a, _ = C.kmeans(x, 3, seed=0)
    truth = np.repeat(np.arange(3), 20)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, a) == 1.0


# ------------------------------------------------------------------------------- 5-6. matching, cross map


def _random_sets(n, k, d, seed):
    return C._normalise(np.random.default_rng(seed).normal(size=(n, k, d))).astype(np.float32)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_matching_equals_brute_force(k):
    p = _random_sets(6, k, 5, seed=k)
    s_perm = C.permutation_similarity(p, p)
    s_hung, perm = C.hungarian_similarity(p, p)
    brute = np.array([[max(sum(float(p[a, i] @ p[b, pi[i]]) for i in range(k)) for pi in itertools.permutations(range(k)))
                       for b in range(6)] for a in range(6)])
    assert np.abs(s_perm - brute).max() < 1e-5 and np.abs(s_hung - brute).max() < 1e-5
    assert np.abs(s_perm - s_perm.T).max() < 1e-5 and np.allclose(np.diag(s_perm), k, atol=1e-5)
    assert np.allclose(C.set_similarity(p, "hungarian"), C.set_similarity(p, "permutations"), atol=1e-5)
    for a, b in [(0, 1), (2, 5)]:  # the optimal permutation attains the value
        assert sum(float(p[a, i] @ p[b, perm[a, b, i]]) for i in range(k)) == pytest.approx(s_hung[a, b], abs=1e-5)


def test_neighbours_cross_map_and_r2():
    p = _random_sets(7, 3, 4, seed=1)
    eligible = np.array([True, True, False, True, True, True, False])
    s = C.set_similarity(p)
    nbr = C.nearest_slides(s, eligible, r=2)
    assert nbr.shape == (7, 2) and np.all(nbr[~eligible] == -1)
    for i in np.nonzero(eligible)[0]:
        cand = [t for t in np.nonzero(eligible)[0] if t != i]
        assert nbr[i, 0] == max(cand, key=lambda t: s[i, t]) and i not in nbr[i] and eligible[nbr[i]].all()
    cmap = C.cross_map(p, nbr)
    assert cmap.shape == (7, 3, 2)
    for i in np.nonzero(eligible)[0]:
        for k in range(3):
            for j in range(2):
                assert cmap[i, k, j] == int(np.argmax(p[nbr[i, j]] @ p[i, k]))
    one = _random_sets(5, 1, 4, seed=2)
    assert np.all(C.cross_map(one, C.nearest_slides(C.set_similarity(one), np.ones(5, bool), 1)) == 0)
    duplicates = np.concatenate([p[:1], p[:1], p[1:3]])  # identical slides: the diagonal is masked, not "top-1"
    assert list(C.nearest_slides(C.set_similarity(duplicates), np.ones(4, bool), 1)[:2, 0]) == [1, 0]


# ----------------------------------------------------------------------------------- 7, 14. loss values


def test_loss_of_uniform_outputs_is_log_k_and_switches():
    k = 512
    s = [torch.zeros(6, k) for _ in range(4)]
    mask = torch.tensor([True, False, True, True, False, True])
    intra = (mask, torch.zeros(4, k))
    inter = (mask, [torch.zeros(4, k), torch.zeros(4, k)])  # r = 2: two target chunks
    total, t = SLPDLoss(k)(s, intra, inter, 0.04)
    assert float(t["loss_intra"]) == pytest.approx(math.log(k), rel=1e-6)
    assert float(t["loss_inter"]) == pytest.approx(math.log(k), rel=1e-6)
    assert float(total) == pytest.approx(2 * math.log(k), rel=1e-6)
    for loss_type, zero in (("intra", "loss_inter"), ("inter", "loss_intra")):
        fn = SLPDLoss(k, loss_type=loss_type)
        _, t = fn([torch.randn(6, k) for _ in range(4)], (mask, torch.randn(4, k)), (mask, [torch.randn(4, k)]), 0.04)
        assert float(t[zero]) == 0.0 and float(t["loss_intra" if zero == "loss_inter" else "loss_inter"]) > 0


def test_view_zero_quirk():
    k = 16
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(3, k, generator=g) for _ in range(4)]
    target = (torch.ones(3, dtype=torch.bool), torch.randn(3, k, generator=g))
    s2 = [s[0] + 5 * torch.randn(3, k, generator=g)] + s[1:]  # change student view 0 only
    quirk = [float(SLPDLoss(k, skip_same_view=True)(v, target, None, 0.04)[1]["loss_intra"]) for v in (s, s2)]
    every = [float(SLPDLoss(k, skip_same_view=False)(v, target, None, 0.04)[1]["loss_intra"]) for v in (s, s2)]
    assert quirk[0] == quirk[1] and every[0] != every[1]


def test_losses_at_init_near_log_k(cohort):
    k = 4096
    pre, _ = clustered(cohort, out_dim=k, hidden_dim=256, bottleneck_dim=256)
    eligible_rows = np.nonzero(pre.clusters["assignment"].numpy() >= 0)[0][:16]
    out = pre.training_step(batch_of(cohort, eligible_rows), 0)
    for term in ("loss_self", "loss_intra", "loss_inter"):
        assert abs(float(out[term]) - math.log(k)) < 0.15 * math.log(k), (term, float(out[term]))


# ------------------------------------------------------------------------------- 9. gradient routing, 14


def test_gradient_routing_and_inter_batch(cohort):
    pre, _ = clustered(cohort, n_neighbours=2)
    rows = np.arange(len(cohort))[::3][:16]
    b = batch_of(cohort, rows)
    views = pre.views(b["grids"], pre._generator(0))
    student_out = pre.student.forward_views(views)
    intra, inter = pre._targets(b["slide_index"], b["tile_index"])
    assert intra[1].shape[0] == int(intra[0].sum()) > 0
    assert len(inter[1]) == 2 and all(t.shape[0] == int(inter[0].sum()) for t in inter[1])  # r = 2: 2x the targets
    total, terms = pre.proto_loss(student_out, intra, inter, 0.04)
    assert float(terms["loss_intra"]) > 0 and float(terms["loss_inter"]) > 0
    total.backward()
    assert all(p.grad is None for p in pre.teacher.parameters())
    for module in (pre.student.backbone, pre.student.head):
        assert sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None) > 0


def test_loss_type_switches_in_the_pretext(cohort):
    rows = np.arange(16)
    for loss_type, zero in (("intra", "loss_inter"), ("inter", "loss_intra")):
        pre, _ = clustered(cohort, loss_type=loss_type)
        out = pre.training_step(batch_of(cohort, rows), 0)
        assert float(out[zero]) == 0.0
        parts = float(out["loss_self"]) + float(out["loss_intra"]) + float(out["loss_inter"])
        assert out["loss"].item() == pytest.approx(parts, rel=1e-6)


@pytest.mark.parametrize("opts", [{"which_feat_to_cluster": "backbone"}, {"cross_assign": "matched"},
                                  {"cross_assign": "region"}, {"matching": "hungarian"}])
def test_variants_run(cohort, opts):
    pre, diag = clustered(cohort, **opts)
    out = pre.training_step(batch_of(cohort, range(16)), 0)
    assert math.isfinite(out["loss"].item()) and float(out["loss_intra"]) > 0 and float(out["loss_inter"]) > 0


# ---------------------------------------------------------------------------------------- 15. determinism


def test_determinism_and_state_round_trip(cohort):
    a, da = clustered(cohort)
    b, db = clustered(cohort)
    for key in ("assignment", "similarity", "neighbours", "cross_targets", "prototypes"):
        assert torch.equal(a.clusters[key], b.clusters[key]), key
    assert {k: v for k, v in da.items() if k != "cluster_seconds"} == {k: v for k, v in db.items() if k != "cluster_seconds"}
    batch = batch_of(cohort, range(16))
    torch.manual_seed(3)
    la = a.training_step(batch, 5)["loss"]
    c = make(init_seed=1)  # other weights, then b's state (= a's before its step)
    c.load_state_dict(copy.deepcopy(b.state_dict()))
    c.offsets = b.offsets
    assert c.clusters["epoch"] == b.clusters["epoch"] and torch.equal(c.clusters["assignment"], b.clusters["assignment"])
    assert c.on_epoch_start(b.clusters["epoch"], cohort) is None  # resuming inside a clustered epoch: no recluster
    torch.manual_seed(3)
    assert torch.equal(c.training_step(batch, 5)["loss"], la)


def test_dataset_validates_order():
    g = np.zeros((4, 2, 3, 3), np.float32)
    ds = RegionGridDataset(g, [0, 0, 1, 1], slide_labels=[0, 1])
    assert list(ds.offsets) == [0, 2, 4] and list(ds.region_index) == [0, 1, 0, 1] and ds.input_key == "grids"
    with pytest.raises(ValueError):
        RegionGridDataset(g, [0, 1, 0, 1])
    with pytest.raises(ValueError):
        RegionGridDataset(g, [1, 1, 0, 0])
    with pytest.raises(ValueError):
        RegionGridDataset(g, [0, 0, 1, 1], region_index=[1, 0, 0, 1])


# ----------------------------------------------------- 8, 10-13. training through the real trainer, resume

TRAIN_EPOCHS = 7  # warm_epoch (demo) = 2, so epochs 3..6 re-cluster: three epoch-to-epoch comparisons


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """SLPD (demo preset) through the one trainer on 24 synthetic slides, recording each epoch's clustering
    diagnostics and the two centres after every step."""
    from histobench.pretrain.trainer import pretrain

    ds = synthetic_grid_cohort(n_slides=24, regions_per_slide=(6, 16), dim=96, grid=8, seed=1)
    enc = HIPTRegionEncoder(HIPTRegionEncoder.preset("demo"))
    pre = SLPD(SLPD.preset("demo"))
    diags, centres = {}, []
    start, after = pre.on_epoch_start, pre.after_optimizer_step

    def record(epoch, dataset):
        d = start(epoch, dataset)
        if d:
            diags[epoch] = d
        return d

    def record_centres(step):
        after(step)
        centres.append((pre.loss.center.clone(), pre.proto_loss.proto.center.clone()))

    pre.on_epoch_start, pre.after_optimizer_step = record, record_centres
    opts = SLPD.train_options("demo", epochs=TRAIN_EPOCHS, steps_per_epoch=6)
    res = pretrain(pre, enc, ds, opts, out_dir=tmp_path_factory.mktemp("slpd"), seed=0, device="cpu")
    return ds, pre, res, diags, centres


def test_training_past_warm_up_retrieves_same_label_slides(trained):
    """Check 12 as a pipeline check: these CPU steps barely move the teacher, so the retrieval rate comes from
    the synthetic cohort's structure (a random-init encoder scores the same); it is not evidence of learning."""
    ds, pre, res, diags, _ = trained
    assert sorted(diags) == list(range(3, TRAIN_EPOCHS))  # epoch > warm_epoch = 2
    hist = res.history
    assert all(h["loss_intra"] == 0 and h["loss_inter"] == 0 for h in hist[:18])
    assert all(h["loss_intra"] > 0 and h["loss_inter"] > 0 for h in hist[18:])
    assert all(math.isfinite(h["loss"]) for h in hist)
    last = diags[TRAIN_EPOCHS - 1]
    assert {"assign_changed", "assign_ari", "proto_cos"} <= set(last)
    assert last["nn_same_label"] >= 0.75 and last["nn_same_label_chance"] == pytest.approx(0.5, abs=0.05)
    # label-permutation control: the same neighbours against shuffled slide labels sit at chance
    nbr = pre.clusters["neighbours"][:, 0].numpy()
    has = nbr >= 0
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(200):
        perm = rng.permutation(ds.slide_labels)
        rates.append((perm[has] == perm[nbr[has]]).mean())
    assert abs(np.mean(rates) - 0.5) < 0.1 and last["nn_same_label"] > np.mean(rates) + 0.2


def test_no_collapse(trained):
    """Check 8: many teacher codes in use, teacher entropy strictly inside (0, ln K), both centres moving."""
    ds, pre, res, _, centres = trained
    k = pre.options.out_dim
    entropies = [h["teacher_entropy"] for h in res.history]
    assert all(0.0 < e < math.log(k) for e in entropies)
    with torch.no_grad():
        codes = torch.cat([pre.teacher(centre_crop(ds.grids[i:i + 64], pre.options.global_crop_size)).argmax(-1)
                           for i in range(0, len(ds), 64)])
    # collapse would put every region on one code; measured: 16 codes, the commonest taking under a third
    assert codes.unique().numel() >= 8 and torch.bincount(codes).max().item() < 0.5 * len(codes)
    self_c = torch.stack([c for c, _ in centres])
    proto_c = torch.stack([c for _, c in centres])
    assert (self_c[1:] - self_c[:-1]).abs().amax(dim=(1, 2)).gt(0).all()  # the DINO centre changes every step
    moved = (proto_c[1:] - proto_c[:-1]).abs().amax(dim=(1, 2))
    assert moved[:17].eq(0).all() and moved[18:].gt(0).all()  # c' starts moving with the prototype terms


def test_prototype_stability(trained):
    """Check 10: assignments and matched prototypes are stable between epochs, and not less so over training."""
    _, _, _, diags, _ = trained
    epochs = sorted(e for e in diags if "assign_ari" in diags[e])
    assert epochs == list(range(4, TRAIN_EPOCHS))
    ari = [diags[e]["assign_ari"] for e in epochs]
    cos = [diags[e]["proto_cos"] for e in epochs]
    assert ari[-1] > 0.7 and ari[-1] >= ari[0] - 0.05
    assert cos[-1] > 0.9 and cos[-1] >= cos[0] - 0.02


def test_cluster_semantics(trained):
    """Check 11: per-slide clusters are purer in the planted tissue types than a within-slide shuffle of them."""
    ds, pre, _, _, _ = trained
    assignment = pre.clusters["assignment"].numpy()
    types = np.asarray(ds.region_types)

    def purity(t):
        hits = total = 0
        for s in range(len(ds.offsets) - 1):
            lo, hi = ds.offsets[s], ds.offsets[s + 1]
            a = assignment[lo:hi]
            if (a < 0).all():
                continue  # ineligible slide: no clusters
            for c in np.unique(a):
                hits += np.bincount(t[lo:hi][a == c]).max()
            total += hi - lo
        return hits / total

    rng = np.random.default_rng(0)
    controls = []
    for _ in range(50):
        shuffled = types.copy()
        for s in range(len(ds.offsets) - 1):
            lo, hi = ds.offsets[s], ds.offsets[s + 1]
            shuffled[lo:hi] = rng.permutation(shuffled[lo:hi])
        controls.append(purity(shuffled))
    assert purity(types) >= 0.8 and purity(types) > np.mean(controls) + 0.1


def test_downstream_knn_on_mean_region_embeddings(trained):
    """Check 13, first part: a 5-NN on mean teacher region embeddings separates the synthetic classes (AUC > 0.5).
    Its second part (better than random init) is not reached by CPU-sized training: on a harder synthetic cohort
    (signal 0.6, slide effect 0.5) 300 steps gave 5-NN AUC 0.694 against 0.730 for the random-init encoder."""
    from sklearn.metrics import roc_auc_score

    ds, pre, _, _, _ = trained
    with torch.no_grad():
        f = torch.cat([pre.teacher.backbone(centre_crop(ds.grids[i:i + 64], pre.options.global_crop_size))
                       for i in range(0, len(ds), 64)])
    f = torch.nn.functional.normalize(f, dim=1).numpy()
    slides = np.stack([f[ds.offsets[s]:ds.offsets[s + 1]].mean(0) for s in range(len(ds.offsets) - 1)])
    slides /= np.linalg.norm(slides, axis=1, keepdims=True)
    sim = slides @ slides.T
    np.fill_diagonal(sim, -np.inf)
    nn5 = np.argsort(-sim, axis=1)[:, :5]
    y = np.asarray(ds.slide_labels)
    assert roc_auc_score(y, y[nn5].mean(1)) > 0.75


def test_exact_resume_through_the_trainer(tmp_path):
    from histobench.pretrain.trainer import pretrain

    ds = synthetic_grid_cohort(n_slides=6, regions_per_slide=(4, 8), dim=96, grid=8, seed=2)
    enc = HIPTRegionEncoder(HIPTRegionEncoder.preset("demo"))

    def run(out, max_steps=None):
        pre = SLPD(SLPD.preset("demo"), warm_epoch=0, min_regions=4, n_prototypes=2)
        opts = SLPD.train_options("demo", epochs=3, batch_size=8, steps_per_epoch=2, warmup_epochs=0)
        return pretrain(pre, enc, ds, opts, out_dir=out, seed=0, device="cpu", max_steps=max_steps)

    full = [h["loss"] for h in run(tmp_path / "a").history]
    assert run(tmp_path / "b", max_steps=3).steps == 3  # stops inside epoch 1, the first clustered epoch
    resumed = run(tmp_path / "b")
    assert resumed.resumed_from == 3
    assert np.allclose([h["loss"] for h in resumed.history], full, rtol=1e-6, atol=1e-7)
