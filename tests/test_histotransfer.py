"""HistoTransfer (spec histotransfer.md): truncated encoders (7.1, 7.2), KimiaNet (7.3), the attention-pooling
aggregator (7.4), hub models offline, the feature cache keyed by the cut, the study and a demo run."""

import os

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from histobench.errors import HistobenchError  # noqa: E402
from histobench.features.cache import cache_key, weights_hash  # noqa: E402
from histobench_histotransfer.attention_pool import AttentionPool  # noqa: E402
from histobench_histotransfer.histology import MODELS, HistologyEncoder  # noqa: E402
from histobench_histotransfer.kimianet import KimiaNet, load_kimianet  # noqa: E402
from histobench_timm.encoder import TimmEncoder  # noqa: E402

# spec §2.2: (cut, vector dim, map side at 512, map side at 224, trainable encoder parameters)
TABLE = {
    "resnet18": [("layer1", 64, 128, 56, 157_504), ("layer2", 128, 64, 28, 683_072),
                 ("layer3", 256, 32, 14, 2_782_784), ("layer4", 512, 16, 7, 11_176_512)],
    "densenet121": [("denseblock1", 256, 128, 56, 344_576), ("transition1", 128, 64, 28, 377_856),
                    ("denseblock2", 512, 64, 28, 1_297_536), ("transition2", 256, 32, 14, 1_429_632),
                    ("denseblock3", 1024, 32, 14, 4_267_392), ("transition3", 512, 16, 7, 4_793_728),
                    ("denseblock4", 1024, 16, 7, 6_951_808), ("norm5", 1024, 16, 7, 6_953_856)],
}


def _cut(arch, cut, seed=0, **kw):
    torch.manual_seed(seed)
    return TimmEncoder(arch=arch, truncate_at=cut, **kw).build().eval()


def _one_line(err):
    assert "\n" not in str(err.value)
    return str(err.value)


# ------------------------------------------------------------------------------------ 7.1 encoder shapes


@pytest.mark.parametrize("arch", sorted(TABLE))
def test_truncation_table(arch):
    """Every row of §2.2: vector dim, pre-pool map sides for 512 and 224 inputs, exact trainable parameters.

    The map sides come from one forward of the whole network per input size, hooked at every cut point (7.2
    shows a cut's map is that layer's map); every cut's own encoder runs on a small batch, the first also at
    224 and 512 (the CPU budget: a DenseNet forward at 512 per cut would dominate the suite)."""
    rows = TABLE[arch]
    full = timm.create_model(arch, num_classes=0).eval()
    assert sum(p.numel() for p in full.parameters()) == rows[-1][-1]  # the last cut is the whole network
    prefix = "features." if arch.startswith("densenet") else ""
    maps: dict[str, tuple] = {}
    for cut, *_ in rows:
        full.get_submodule(prefix + cut).register_forward_hook(
            lambda _m, _i, out, cut=cut: maps.__setitem__(cut, tuple(out.shape)))
    with torch.no_grad():
        for size, col in ((224, 3), (512, 2)):
            maps.clear()
            full(torch.randn(1, 3, size, size))
            assert {cut: maps[cut] for cut, *_ in rows} == {r[0]: (1, r[1], r[col], r[col]) for r in rows}, size
    for i, (cut, dim, side512, side224, params) in enumerate(rows):
        module = _cut(arch, cut)
        assert module.embed_dim == dim, cut
        assert sum(p.numel() for p in module.parameters() if p.requires_grad) == params, cut
        sizes = ((64, None), (224, side224), (512, side512)) if i == 0 else ((64, None),)
        with torch.no_grad():
            for size, side in sizes:
                x = torch.randn(2 if size == 64 else 1, 3, size, size)
                fmap, out = module.model.forward_features(x), module(x)
                assert out.shape == (len(x), dim) and fmap.shape[1] == dim, (cut, size)
                assert side is None or fmap.shape[2:] == (side, side), (cut, size)
                assert torch.allclose(out, fmap.mean(dim=(2, 3)), atol=1e-5)  # global average pooling
        assert module.forward_tokens(torch.randn(1, 3, 64, 64)).shape[-1] == dim  # CNN tokens: the cut's map cells
        assert module.num_prefix_tokens == 0


# ------------------------------------------------------------------------------- 7.2 truncation = prefix


@pytest.mark.parametrize("arch,cut,layer", [("resnet18", "layer2", "layer2"), ("resnet18", "layer3", "layer3"),
                                            ("densenet121", "transition2", "features.transition2"),
                                            ("densenet121", "denseblock3", "features.denseblock3")])
def test_truncated_output_is_the_full_networks_layer_output(arch, cut, layer):
    torch.manual_seed(0)
    full = timm.create_model(arch, num_classes=0).eval()
    module = _cut(arch, cut, seed=0)
    seen = []
    full.get_submodule(layer).register_forward_hook(lambda _m, _i, out: seen.append(out))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        full(x)
        pre_pool = module.model.forward_features(x)
    assert pre_pool.shape == seen[0].shape
    assert (pre_pool - seen[0]).abs().max().item() <= 1e-6
    # the cut's state dict is the full network's, restricted to the kept modules (same names and values)
    own, ref = module.model.state_dict(), full.state_dict()
    assert set(own) < set(ref) and all(torch.equal(v, ref[k]) for k, v in own.items())


def test_vit_block_cut_is_a_prefix_with_cls_attention():
    torch.manual_seed(0)
    full = timm.create_model("vit_small_patch16_224", num_classes=0, img_size=64, dynamic_img_size=True).eval()
    module = _cut("vit_small_patch16_224", "block:3", img_size=64)
    assert len(module.model.blocks) == 3 and module.embed_dim == 384
    seen = []
    full.blocks[2].register_forward_hook(lambda _m, _i, out: seen.append(out))
    kept = []
    module.model.blocks[2].register_forward_hook(lambda _m, _i, out: kept.append(out))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full(x)
        out = module(x)
        tokens = module.forward_tokens(x)
    assert (kept[0] - seen[0]).abs().max().item() <= 1e-6
    assert torch.allclose(out, tokens[:, 0], atol=1e-6)  # class-token pooling after the final norm
    assert module.cls_attention(x).shape == (2, 6, 16)
    mean = _cut("vit_small_patch16_224", "block:3", img_size=64, pool="avg")
    with torch.no_grad():
        assert torch.allclose(mean(x), mean.forward_tokens(x)[:, 1:].mean(1), atol=1e-5)


def test_densenet_norm5_has_no_relu_unless_asked():
    """Pitfall 3: the paper pools norm5 without ReLU (values can be negative); relu gives timm's own output."""
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    timm_full = timm.create_model("densenet121", num_classes=0).eval()
    plain, relu = _cut("densenet121", "norm5"), _cut("densenet121", "norm5", final_act="relu")
    with torch.no_grad():
        a, b, ref = plain(x), relu(x), timm_full(x)
    assert (a < 0).any() and (b >= 0).all()
    assert (b - ref).abs().max().item() <= 1e-6
    assert not torch.allclose(a, b)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("arch,cut,valid", [("resnet18", "layer5", "layer1, layer2, layer3, layer4"),
                                            ("densenet121", "layer3", "denseblock1, transition1"),
                                            ("vit_small_patch16_224", "block:13", "block:1 ... block:12")])
def test_bad_cut_name_lists_the_valid_ones(arch, cut, valid):
    for step in ("check", "build"):  # check() is what a run calls when it is resolved, before any slide is read
        with pytest.raises(HistobenchError) as err:
            getattr(TimmEncoder(arch=arch, truncate_at=cut, img_size=64), step)()
        text = _one_line(err)
        assert f"encoder.truncate_at={cut!r}" in text and valid in text


def test_a_bad_cut_stops_a_run_before_the_cohort_is_tiled(tmp_path):
    from typer.testing import CliRunner

    from histobench.cli.app import build_app

    work = tmp_path / "work"
    res = CliRunner().invoke(build_app(), ["run", "--pretext", "none", "--task", "tcga-nsclc", "--demo", "--workdir",
                                           str(work), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                                           "-o", "encoder.arch=resnet18", "-o", "encoder.model_kwargs={}",
                                           "-o", "encoder.truncate_at=layer9"], env={"COLUMNS": "300"})
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1].startswith("error: option encoder.truncate_at='layer9': architecture "
                                                          "'resnet18' has no such cut point (valid: ")
    assert not (work / "tiles").exists() and not (work / "demo").exists()


def test_pool_or_act_without_a_cut_is_an_error():
    with pytest.raises(HistobenchError, match="encoder.truncate_at") as err:
        TimmEncoder(arch="resnet18", final_act="relu").build()
    _one_line(err)
    with pytest.raises(HistobenchError, match="'avg' or 'max'"):
        TimmEncoder(arch="resnet18", truncate_at="layer2", pool="token").build()


@pytest.mark.parametrize("options", [{"arch": "resnet18", "truncate_at": "layer2", "model_kwargs": {}},
                                     {"truncate_at": "block:2", "pool": "avg"}])
def test_cut_encoders_pass_the_encoder_contract(options):
    from histobench.testing import check_encoder

    check_encoder("timm", options)  # the demo preset + a cut: forward, gradients, tokens, grid, [CLS] attention


def test_untruncated_timm_encoder_is_unchanged():
    torch.manual_seed(0)
    module = TimmEncoder(arch="resnet18").build()
    assert type(module.model).__name__ == "ResNet" and module.embed_dim == 512
    assert TimmEncoder(arch="resnet18").weights_tag() == "random"


# ------------------------------------------------------------------------------ cache keyed by the cut


def test_feature_cache_is_keyed_by_the_cut():
    """Different cuts differ in their state dict (hash); pooling and activation do not, so they are in the tag."""
    variants = [{"truncate_at": "layer2"}, {"truncate_at": "layer3"}, {"truncate_at": "layer3", "final_act": "relu"},
                {"truncate_at": "layer3", "pool": "max"}]
    keys, hashes = set(), []
    for v in variants:
        enc = TimmEncoder(arch="resnet18", **v)
        torch.manual_seed(0)
        w = weights_hash(enc.build())
        hashes.append(w)
        keys.add(cache_key(f"{enc.name}:{enc.weights_tag()}", w, 0.5, 256))
    assert hashes[0] != hashes[1]  # a different cut is a different state dict
    assert hashes[1] == hashes[2] == hashes[3]  # ... but activation and pooling are not in it
    assert len(keys) == 4
    assert TimmEncoder(arch="resnet18", truncate_at="layer3", final_act="relu").weights_tag() == "random@layer3+relu"



def test_features_digest_covers_every_option_that_shapes_the_features():
    """Pooling, activation, input size, mean and std leave the state dict as it is; the digest must not."""
    base = {"arch": "resnet18", "truncate_at": "layer3", "model_kwargs": {}}
    variants = [{}, {"pool": "max"}, {"final_act": "relu"}, {"img_size": 128}, {"mean": (0.5, 0.5, 0.5)},
                {"std": (0.25, 0.25, 0.25)}, {"truncate_at": "layer2"}]
    digests = [TimmEncoder(**{**base, **v}).features_digest() for v in variants]
    assert len(set(digests)) == len(variants)
    assert TimmEncoder(**base).features_digest() == digests[0]  # deterministic: a rerun finds its cache
    k = KimiaNet(weights=None)
    assert k.features_digest() != KimiaNet(weights=None, mean=(0.7, 0.6, 0.7)).features_digest()


def test_extract_with_weights_keys_the_cache_by_cut_options_and_transform(tmp_path):
    """``histobench extract --weights F`` with the same weights but another pooling or normalisation extracts again into its own folder (before, all three shared one ``timm-file-w-...`` cache entry and the
    second and third silently got the first one's features); the same options find their cache."""
    import h5py
    import numpy as np
    from typer.testing import CliRunner

    from histobench.cli.app import build_app

    enc = TimmEncoder(arch="resnet18", truncate_at="layer1", model_kwargs={}, img_size=32)
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    torch.save(enc.build().state_dict(), weights)
    base = ["extract", "--task", "tcga-nsclc", "--demo", "--weights", str(weights), "--workdir", str(tmp_path / "work"),
            "-o", "task.demo_patients=4", "-o", "task.demo_slide_px=1024", "-o", "encoder.arch=resnet18",
            "-o", "encoder.truncate_at=layer1", "-o", "encoder.model_kwargs={}", "-o", "encoder.img_size=32"]
    variants = {"plain": [], "max": ["-o", "encoder.pool=max"], "mean": ["-o", "encoder.mean=[0.5,0.5,0.5]"]}
    root, feats = tmp_path / "work" / "features", {}
    for name, extra in variants.items():
        before = set(root.iterdir()) if root.exists() else set()
        result = CliRunner().invoke(build_app(), [*base, *extra], env={"COLUMNS": "300"})
        assert result.exit_code == 0, result.output
        assert " 0 cached" in result.output and "0 slides extracted" not in result.output, result.output
        (folder,) = set(root.iterdir()) - before  # a folder of its own
        assert folder.name.startswith("timm-file-w-")
        first = sorted(folder.glob("*.h5"))[0]
        with h5py.File(first) as f:
            feats[name] = (first.name, f["features"][:])
    assert feats["plain"][0] == feats["max"][0] == feats["mean"][0]  # the same slide in every folder
    assert (feats["max"][1] >= feats["plain"][1] - 1e-6).all() and (feats["max"][1] > feats["plain"][1] + 1e-3).any()
    assert not np.allclose(feats["plain"][1], feats["mean"][1])
    again = CliRunner().invoke(build_app(), base, env={"COLUMNS": "300"})
    assert again.exit_code == 0 and "0 slides extracted" in again.output, again.output


# ------------------------------------------------------------------------------------------ 7.3 KimiaNet


def _kimianet_file(path, seed=1):
    torch.manual_seed(seed)
    dense = timm.create_model("densenet121", num_classes=0)
    state = {f"module.model.0.{k[len('features.'):]}": v.clone() for k, v in dense.state_dict().items()}
    state["module.fc_4.weight"] = torch.randn(30, 1024)
    state["module.fc_4.bias"] = torch.randn(30)
    torch.save(state, path)
    return dense.eval()


def test_kimianet_loader_maps_the_dataparallel_layout(tmp_path):
    path = tmp_path / "KimiaNetPyTorchWeights.pth"
    reference = _kimianet_file(path)
    target = timm.create_model("densenet121", num_classes=0)
    counts = load_kimianet(target, path)
    assert counts == {"loaded": len(reference.state_dict()), "dropped_head": 2}
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in target.state_dict().items())
    enc = KimiaNet(weights=str(path))
    assert enc.weights_tag() == "file:KimiaNetPyTorchWeights.pth@norm5"
    module = enc.build().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = module(x)
    assert out.shape == (2, 1024) and module.embed_dim == 1024
    assert (out < 0).any()  # no ReLU after norm5 (final_act=relu: tested on the timm cut above)
    with torch.no_grad():  # KimiaNet's own extractor: norm5 average-pooled, no ReLU
        maps = reference.features[:-1](x)
        norm5 = reference.features.norm5
        expected = torch.nn.functional.batch_norm(maps, norm5.running_mean, norm5.running_var, norm5.weight, norm5.bias,
                                                  False, 0.0, norm5.eps).mean((2, 3))
    assert (out - expected).abs().max().item() <= 1e-5
    relu = KimiaNet(weights=str(path), final_act="relu").build().eval()  # 7.3: with relu, no output is negative
    with torch.no_grad():
        out_relu = relu(x)
    assert (out_relu >= 0).all() and torch.allclose(out_relu, torch.nn.functional.relu(
        torch.nn.functional.batch_norm(maps, norm5.running_mean, norm5.running_var, norm5.weight, norm5.bias, False, 0.0,
                                       norm5.eps)).mean((2, 3)), atol=1e-5)


def test_kimianet_errors_name_the_option(tmp_path):
    with pytest.raises(HistobenchError, match="encoder.weights=") as err:
        KimiaNet().build()
    _one_line(err)
    with pytest.raises(HistobenchError, match="encoder.weights: KimiaNet weights file not found") as err:
        KimiaNet(weights=str(tmp_path / "nope.pth")).build()
    _one_line(err)
    resnet = tmp_path / "resnet.pth"  # keys that do not fit at all
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), resnet)
    with pytest.raises(HistobenchError, match="does not fit KimiaNet.*module.model.0") as err:
        KimiaNet(weights=str(resnet)).build()
    _one_line(err)
    partial = tmp_path / "partial.pth"  # the right layout, one block short
    state = {f"module.model.0.{k[9:]}": v for k, v in timm.create_model("densenet121", num_classes=0).state_dict().items()
             if "denseblock4" not in k}
    torch.save(state, partial)
    with pytest.raises(HistobenchError, match=r"missing \[features.denseblock4") as err:
        KimiaNet(weights=str(partial)).build()
    _one_line(err)


# ------------------------------------------------------------------------------------- hub models offline


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1 (else the hub may hang)")
@pytest.mark.parametrize("model", sorted(MODELS))
def test_hub_models_offline_fail_in_one_line(model):
    import time

    t0 = time.perf_counter()
    with pytest.raises(HistobenchError) as err:
        HistologyEncoder(model=model).build()
    text = _one_line(err)
    assert "encoder.checkpoint=FILE" in text and MODELS[model].hub_id in text
    assert time.perf_counter() - t0 < 20


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1 (else the hub may hang)")
def test_timm_hub_id_offline_names_the_checkpoint_option():
    with pytest.raises(HistobenchError, match="encoder.checkpoint=FILE") as err:
        TimmEncoder(arch="hf-hub:1aurent/vit_small_patch16_224.lunit_dino").build()
    _one_line(err)


def test_histology_model_from_a_local_file(tmp_path):
    enc = HistologyEncoder(model="lunit-dino-vits16", pretrained=False, img_size=32)
    assert enc.transform().mean == MODELS["lunit-dino-vits16"].mean and enc.transform().size == 32
    torch.manual_seed(3)
    source = enc.build().eval()
    path = tmp_path / "lunit.pth"
    torch.save(source.model.state_dict(), path)
    loaded = HistologyEncoder(model="lunit-dino-vits16", checkpoint=str(path), img_size=32, truncate_at="block:2").build()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = source.model.forward_features(x)  # the whole model's tokens; the cut's block 2 output is a prefix
        seen = []
        source.model.blocks[1].register_forward_hook(lambda _m, _i, out: seen.append(out))
        source.model.forward_features(x)
        kept = []
        loaded.eval().model.blocks[1].register_forward_hook(lambda _m, _i, out: kept.append(out))
        loaded(x)
    assert ref.shape[-1] == 384 and torch.allclose(kept[0], seen[0], atol=1e-6)
    assert HistologyEncoder(model="uni", checkpoint=str(path)).weights_tag() == "file:lunit.pth"
    other = tmp_path / "other.pth"  # a file of another architecture: one line, no partial load
    torch.save({k: v for k, v in source.model.state_dict().items() if not k.startswith("blocks.11.")}, other)
    with pytest.raises(HistobenchError, match="does not match the model.*blocks.11") as err:
        HistologyEncoder(model="lunit-dino-vits16", checkpoint=str(other), img_size=32).build()
    _one_line(err)


# -------------------------------------------------------------------------------------- 7.4 aggregator


def test_attention_pool_parameters_and_attention():
    torch.manual_seed(0)
    net = AttentionPool().build(512, 2).eval()
    assert sum(p.numel() for p in net.parameters()) == 150_149
    assert sum(p.numel() for p in AttentionPool(patch_head=False).build(512, 2).parameters()) == 150_149 - 130
    x = torch.randn(1, 37, 512)
    with torch.no_grad():
        out = net.forward_all(x)
        logits, att = net(x)
        perm = torch.randperm(37)
        logits_perm, att_perm = net(x[:, perm])
        same = net(x[:, :1].expand(1, 9, 512))[1]
        single, single_att = net(x[:, :1])
    assert (att > 0).all() and torch.allclose(att.sum(1), torch.ones(1))
    assert torch.allclose(logits, logits_perm, atol=1e-6) and torch.allclose(att[0, perm], att_perm[0], atol=1e-6)
    assert torch.allclose(same, torch.full((1, 9), 1 / 9), atol=1e-6)
    assert single.shape == (1, 2) and torch.allclose(single_att, torch.ones(1, 1))
    z = (out["attention"].unsqueeze(-1) * out["h"]).sum(1)
    assert torch.allclose(out["z"], z, atol=1e-6) and out["h"].shape == (1, 37, 64)
    assert torch.allclose(torch.softmax(out["scores"], 1), att) and out["patch_logits"].shape == (1, 37, 2)


def test_attention_pool_padding_invariance():
    torch.manual_seed(0)
    net = AttentionPool().build(16, 3).eval()
    x = torch.randn(1, 5, 16)
    padded = torch.cat([x, torch.randn(1, 4, 16)], 1)
    mask = torch.tensor([[True] * 5 + [False] * 4])
    with torch.no_grad():
        a, att_a = net(x)
        b, att_b = net(padded, mask)
    assert torch.allclose(a, b, atol=1e-6) and (att_b[0, 5:] == 0).all() and torch.allclose(att_a, att_b[:, :5])


# --------------------------------------------------------------------------------------------- study


def test_study_commands():
    from histobench_histotransfer.study import DENSENET_CUTS, study_commands

    demo = study_commands(demo=True, protocols=["frozen-mil", "topk-finetune"], common=["--tracking-uri", "sqlite:///x.db"])
    runs, board = demo[:-1], demo[-1]
    assert len(runs) == 4 and all(c[:2] == ["run", "--pretext"] and "--demo" in c and "attention-pool" in c for c in runs)
    assert sum("--protocol" in c for c in runs) == 1
    assert board[:3] == ["leaderboard", "--task", "tcga-nsclc"] and board[-2:] == ["--tracking-uri", "sqlite:///x.db"]
    full = study_commands(kimianet_weights="/m/k.pth", histology=("uni",), protocols=["frozen-mil"])[:-1]
    cuts = [next(a.split("=", 1)[1] for a in c if a.startswith("encoder.truncate_at=")) for c in full if "--encoder" not in c
            or "kimianet" in c]
    assert cuts.count("layer4") == 3 and cuts.count("denseblock3") == 2 and len(full) == 4 + 2 + 8 + 8 + 1
    assert all(f"encoder.truncate_at={c}" in sum(full, []) for c in DENSENET_CUTS)
    assert any("encoder.arch=densenet121.tv_in1k" in c for c in full)  # torchvision's weights (spec §3)


def test_study_command_prints_and_checks_protocols():
    from typer.testing import CliRunner

    from histobench.cli.app import build_app

    result = CliRunner().invoke(build_app(), ["histotransfer-study", "--demo", "--protocol", "frozen-mil"])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("histobench ")]
    assert len(lines) == 4 and lines[-1].startswith("histobench leaderboard")
    bad = CliRunner().invoke(build_app(), ["histotransfer-study", "--protocol", "nope"])
    assert bad.exit_code != 0 and "nope" in bad.output


# ----------------------------------------------------------------------------------- end to end (demo)


def test_demo_run_with_a_truncated_resnet_reaches_the_leaderboard(tmp_path):
    from typer.testing import CliRunner

    from histobench.cli.app import build_app
    from histobench.leaderboard import build_leaderboard

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    small = ["-o", "task.demo_patients=12", "-o", "task.demo_slide_px=1536", "-o", "task.folds=3", "-o", "eval.epochs=8"]
    args = ["run", "--pretext", "none", "--task", "tcga-nsclc", "--demo", "--aggregator", "attention-pool",
            "--workdir", str(tmp_path / "work"), "--tracking-uri", uri, "-o", "encoder.arch=resnet18",
            "-o", "encoder.truncate_at=layer2", "-o", "encoder.model_kwargs={}", *small]
    result = CliRunner().invoke(build_app(), args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    folders = [p.name for p in (tmp_path / "work" / "features").iterdir()]
    assert len(folders) == 1 and "layer2" in folders[0]
    df = build_leaderboard("tcga-nsclc", uri)
    assert len(df) == 1 and df.loc[0, "encoder"] == "timm (resnet18 @layer2)" and df.loc[0, "aggregator"] == "attention-pool"
    assert 0.0 <= float(df.loc[0, "macro_auc"].split(" ± ")[0]) <= 1.0
