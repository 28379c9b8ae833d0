"""Encoder tokens and last-block [CLS] attention: timm ViTs (with and without registers, q/k norm), a CNN, HIPT's region ViT."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from histobench.errors import HistobenchError  # noqa: E402
from histobench.ssl.attention import vit_cls_attention  # noqa: E402
from histobench_slpd.encoder import HIPTRegionEncoder  # noqa: E402
from histobench_timm.encoder import TimmEncoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

# the timm demo preset with 2 blocks: patch 8, width 96, 3 heads, 64 px
TINY = {"arch": "vit_small_patch16_224", "img_size": 64,
        "model_kwargs": {"patch_size": 8, "embed_dim": 96, "depth": 2, "num_heads": 3}}


def vit(**model_kwargs):
    torch.manual_seed(0)
    module = TimmEncoder(**{**TINY, "model_kwargs": {**TINY["model_kwargs"], **model_kwargs}}).build().eval()
    with torch.no_grad():  # sharper than a fresh init, so the attention is far from uniform
        module.model.blocks[-1].attn.qkv.weight.mul_(6.0)
    return module


def reference_attention(blocks, forward, x, prefix):
    """The last block's softmax as timm computes it without fused attention, read off its attention dropout."""
    attn = blocks[-1].attn
    rows = []
    handle = attn.attn_drop.register_forward_hook(lambda _m, _i, out: rows.append(out[:, :, 0]))  # [B, heads, T]
    fused = attn.fused_attn
    attn.fused_attn = False
    try:
        with torch.no_grad():
            forward(x)
    finally:
        attn.fused_attn = fused
        handle.remove()
    (full,) = rows
    patches = full[..., prefix:]
    return full, patches / patches.sum(-1, keepdim=True)


def test_vit_cls_attention_equals_unfused_attention():
    m = vit()
    x = torch.randn(2, 3, 64, 64)
    assert m.num_prefix_tokens == 1
    fused_before = [b.attn.fused_attn for b in m.model.blocks]
    with torch.no_grad():
        att = m.cls_attention(x)
    full, ref = reference_attention(m.model.blocks, m.model.forward_features, x, 1)
    assert att.shape == (2, 3, (64 // 8) ** 2)
    assert torch.allclose(att.sum(-1), torch.ones(2, 3), atol=1e-5)
    assert (att - ref).abs().max() < 1e-5
    assert att.max() > 5 / 64  # not the uniform map a broken recomputation could also match
    assert full[..., 0].max() > 1e-4  # the CLS->CLS entry that was dropped was not negligible
    # nothing global or per-block was switched, and the hook is gone
    assert [b.attn.fused_attn for b in m.model.blocks] == fused_before
    assert not m.model.blocks[-1].attn._forward_pre_hooks


def test_tokens_grid_and_dynamic_size():
    m = vit()
    with torch.no_grad():
        for side in (64, 48):
            x = torch.randn(2, 3, side, side)
            h, w = m.token_grid(x)
            assert (h, w) == (side // 8, side // 8)
            assert m.forward_tokens(x).shape == (2, 1 + h * w, 96)
            assert torch.equal(m.patch_tokens(x), m.forward_tokens(x)[:, 1:])
            assert m.cls_attention(x).shape == (2, 3, h * w)
        x = torch.randn(1, 3, 32, 48)
        assert m.token_grid(x) == (4, 6) and m.cls_attention(x).shape == (1, 3, 24)
        # forward_tokens ends with the final norm: its CLS token is what forward() returns
        x = torch.randn(2, 3, 64, 64)
        assert torch.allclose(m.forward_tokens(x)[:, 0], m(x), atol=1e-6)


def test_register_tokens_are_dropped():
    m = vit(reg_tokens=4, no_embed_class=True)
    x = torch.randn(2, 3, 64, 64)
    assert m.num_prefix_tokens == 5
    with torch.no_grad():
        tokens = m.forward_tokens(x)
        att = m.cls_attention(x)
    assert tokens.shape == (2, 5 + 64, 96) and m.patch_tokens(x).shape == (2, 64, 96)
    full, ref = reference_attention(m.model.blocks, m.model.forward_features, x, 5)
    assert full.shape[-1] == 69 and att.shape == (2, 3, 64)
    assert (att - ref).abs().max() < 1e-5
    assert torch.allclose(att.sum(-1), torch.ones(2, 3), atol=1e-5)
    assert full[..., 1:5].sum(-1).min() > 1e-4  # the registers took mass that the renormalisation removed


def test_qk_norm_is_respected():
    m = vit(qk_norm=True)
    with torch.no_grad():
        torch.nn.init.normal_(m.model.blocks[-1].attn.q_norm.weight, 1.0, 0.5)  # a norm that changes q
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        att = m.cls_attention(x)
    _, ref = reference_attention(m.model.blocks, m.model.forward_features, x, 1)
    assert (att - ref).abs().max() < 1e-5


def test_cnn_tokens_and_a_clear_error_for_attention():
    torch.manual_seed(0)
    cnn = TimmEncoder(arch="resnet18", img_size=64).build().eval()
    x = torch.randn(2, 3, 64, 64)
    assert cnn.num_prefix_tokens == 0
    with torch.no_grad():
        assert cnn.token_grid(x) == (2, 2)
        assert cnn.forward_tokens(x).shape == (2, 4, 512)
        assert torch.equal(cnn.patch_tokens(x), cnn.forward_tokens(x))
        assert cnn.token_grid(torch.randn(1, 3, 96, 128)) == (3, 4)
    with pytest.raises(HistobenchError, match="'resnet18'.*needs a ViT") as info:
        cnn.cls_attention(x)
    assert "\n" not in str(info.value)


def test_a_vit_without_class_token_is_refused():
    m = vit(class_token=False, global_pool="avg")
    assert m.num_prefix_tokens == 0
    with pytest.raises(HistobenchError, match="no \\[CLS\\] token"):
        m.cls_attention(torch.randn(1, 3, 64, 64))


def test_hipt_region_vit_tokens_and_attention():
    torch.manual_seed(0)
    m = HIPTRegionEncoder(HIPTRegionEncoder.preset("demo")).build().eval()
    x = torch.randn(2, 96, 8, 8)
    assert m.num_prefix_tokens == 1 and m.token_grid(x) == (8, 8)
    with torch.no_grad():
        att = m.cls_attention(x)
        assert m.patch_tokens(x).shape == (2, 64, 64)
    _, ref = reference_attention(m.blocks, m, x, 1)
    assert att.shape == (2, 2, 64) and (att - ref).abs().max() < 1e-5
    assert torch.allclose(att.sum(-1), torch.ones(2, 2), atol=1e-5)


def test_core_function_on_a_bare_timm_model():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", num_classes=0, img_size=64, patch_size=8, embed_dim=96,
                              depth=2, num_heads=3).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        att = vit_cls_attention(model, x)
    _, ref = reference_attention(model.blocks, model.forward_features, x, 1)
    assert (att - ref).abs().max() < 1e-5
    with pytest.raises(HistobenchError, match="Linear has no transformer blocks"):
        vit_cls_attention(torch.nn.Linear(2, 2), torch.randn(1, 2))


def test_check_encoder_checks_tokens_and_attention(register_plugin):
    from histobench import hookimpl
    from histobench.testing import check_encoder

    check_encoder("timm")
    check_encoder("timm", {"arch": "resnet18", "model_kwargs": {}})  # CNN: tokens, no attention
    check_encoder("hipt-vit4k")

    class OffByOne(TimmEncoder):
        name = "off-by-one-prefix"

        def build(self):
            module = super().build()
            module.num_prefix_tokens = 2  # claims a register it does not have
            return module

    class Plugin:
        @hookimpl
        def register_encoders(self, register):
            register(OffByOne)

    register_plugin(Plugin(), "off-by-one")
    with pytest.raises(AssertionError, match="expected 2 prefix"):
        check_encoder("off-by-one-prefix")
