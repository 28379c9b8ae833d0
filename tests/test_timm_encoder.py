"""The timm encoder plugin: the demo preset, transform, weights tags, errors, and checkpoint round trips."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from histobench.components import InputTransform  # noqa: E402
from histobench.errors import HistobenchError  # noqa: E402
from histobench_timm.encoder import TimmEncoder  # noqa: E402


def demo(**overrides):
    return TimmEncoder(TimmEncoder.preset("demo"), **overrides)


@pytest.fixture(scope="module")
def demo_module():
    torch.manual_seed(0)
    return demo().build().eval()


def test_demo_preset_builds_small(demo_module):
    n = sum(p.numel() for p in demo_module.parameters())
    assert 300_000 <= n <= 500_000
    assert demo_module.embed_dim == 96
    assert hasattr(demo_module, "model")


def test_forward_and_tokens_shapes(demo_module):
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert demo_module(x).shape == (4, 96)
        assert demo_module.forward_tokens(x).shape == (4, 1 + (64 // 8) ** 2, 96)
        # dynamic image size: local crops of another size go through the same encoder
        assert demo_module(torch.randn(2, 3, 32, 32)).shape == (2, 96)
        assert demo_module.forward_tokens(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 16, 96)


def test_transform_and_weights_tag(tmp_path):
    enc = demo()
    assert enc.transform() == InputTransform(size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert demo(mean=(0.5, 0.5, 0.5)).transform().mean == (0.5, 0.5, 0.5)
    assert enc.weights_tag() == "random"
    assert demo(pretrained=True).weights_tag() == "hub:vit_small_patch16_224"
    assert demo(checkpoint=str(tmp_path / "w.pth")).weights_tag() == "file:w.pth"


def test_unknown_arch_suggests_close_matches():
    with pytest.raises(HistobenchError, match="unknown timm architecture 'vit_smal_patch16_224'.*vit_small_patch16_224"):
        TimmEncoder(arch="vit_smal_patch16_224").build()


def test_missing_checkpoint_names_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(HistobenchError, match="nope.pth") as info:
        demo(checkpoint=str(missing)).build()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("suffix,wrap", [(".pth", None), (".pt", "teacher_prefixed"), (".safetensors", None)])
def test_checkpoint_round_trip(tmp_path, demo_module, suffix, wrap):
    state = {k: v.clone() for k, v in demo_module.model.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif wrap == "teacher_prefixed":  # a training checkpoint: nested and prefixed keys
        torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:
        torch.save(state, path)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = demo(checkpoint=str(path)).build().eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), demo_module(x))


def test_mismatched_checkpoint_is_a_histobench_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(HistobenchError, match="does not match"):
        demo(checkpoint=str(path)).build()


def test_cnn_architecture_and_drop_path(demo_module):
    cnn = TimmEncoder(arch="resnet18", img_size=32).build().eval()
    with torch.no_grad():
        assert cnn(torch.randn(2, 3, 32, 32)).shape == (2, cnn.embed_dim)
        assert cnn.forward_tokens(torch.randn(2, 3, 32, 32)).shape == (2, 1, cnn.embed_dim)
    assert cnn.set_drop_path(0.1) is False
    vit = demo().build()
    assert vit.set_drop_path(0.3) is True
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in vit.model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)


def test_contract_check():
    from histobench.testing import check_encoder

    check_encoder("timm")
