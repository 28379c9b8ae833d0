"""Histopathology foundation models with timm-compatible weights, by name (``histology`` encoder).

HistoTransfer (Sharma et al., IEEE BHI 2021, arXiv:2106.07068) asks whether histopathology-trained encoders
beat ImageNet ones; this registry puts today's public tile encoders next to the ImageNet timm tags. Each entry
names its hub id and the kwargs its model card passes to ``timm.create_model``, its normalisation, and a
plain timm architecture that takes a local copy of the weights (``encoder.checkpoint=FILE``) without the hub:

* ``lunit-dino-vits16``: Kang et al., CVPR 2023, arXiv:2212.04690 (ViT-S/16 DINO; community port on the hub).
* ``uni``, ``uni2-h``: Chen et al., Nature Medicine 2024, arXiv:2308.15474 (gated).
* ``h-optimus-0``: Bioptimus 2024 (ViT-g/14 with 4 registers; hub login).
* ``prov-gigapath``: Xu et al., Nature 2024 (tile encoder, ViT-g/14 style; gated).

The weights are never bundled. Gated models need a Hugging Face token with access; offline, or without
access, building fails in one line that names ``encoder.checkpoint`` (histobench's tests set
``HF_HUB_OFFLINE=1``, without which an offline machine waits for the hub's timeouts). The local architectures
of ``uni2-h``, ``h-optimus-0`` and ``prov-gigapath`` are reconstructed from their hub configs [ours]; a file that
does not fit is a one-line error (strict loading), never a silent partial load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from histobench.components import Encoder, InputTransform, StrictOptions
from histobench.errors import HistobenchError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class HistologyModel:
    """One tile encoder: where its weights live and how timm builds it."""

    hub_id: str
    dim: int
    local_arch: str  # timm architecture for a local file (and for random init)
    hub_kwargs: dict[str, Any] = field(default_factory=dict)
    local_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET[0]
    std: tuple[float, float, float] = IMAGENET[1]
    img_size: int = 224
    access: str = "public"
    licence: str = ""


_GIANT_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}
MODELS: dict[str, HistologyModel] = {
    "lunit-dino-vits16": HistologyModel(
        "hf-hub:1aurent/vit_small_patch16_224.lunit_dino", 384, "vit_small_patch16_224",
        mean=(0.70322989, 0.53606487, 0.66096631), std=(0.21716536, 0.26081574, 0.20723464),
        access="public", licence="Lunit non-commercial"),
    "uni": HistologyModel(
        "hf-hub:MahmoodLab/UNI", 1024, "vit_large_patch16_224",
        hub_kwargs={"init_values": 1e-5, "dynamic_img_size": True},
        local_kwargs={"init_values": 1e-5, "dynamic_img_size": True},
        access="gated (Hugging Face token with access)", licence="CC-BY-NC-ND-4.0"),
    "uni2-h": HistologyModel(
        "hf-hub:MahmoodLab/UNI2-h", 1536, "vit_giant_patch14_224",
        hub_kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                    "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
                    "dynamic_img_size": True, **_GIANT_SWIGLU},
        local_kwargs={"patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
                      "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True,
                      **_GIANT_SWIGLU},
        access="gated (Hugging Face token with access)", licence="CC-BY-NC-ND-4.0"),
    "h-optimus-0": HistologyModel(
        "hf-hub:bioptimus/H-optimus-0", 1536, "vit_giant_patch14_reg4_dinov2",
        hub_kwargs={"init_values": 1e-5, "dynamic_img_size": False},
        local_kwargs={"init_values": 1e-5, "dynamic_img_size": False},
        mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
        access="Hugging Face login", licence="Apache-2.0"),
    "prov-gigapath": HistologyModel(
        "hf-hub:prov-gigapath/prov-gigapath", 1536, "vit_giant_patch14_dinov2",
        local_kwargs={"patch_size": 16, "init_values": 1e-5, "mlp_ratio": 5.33334},
        access="gated (accept the conditions)", licence="Prov-GigaPath terms (research use)"),
}


class HistologyEncoder(Encoder):
    """A histopathology foundation model by name (Lunit DINO, UNI, UNI2-h, H-optimus-0, Prov-GigaPath)."""

    name = "histology"
    presets = {"demo": {"model": "lunit-dino-vits16", "pretrained": False, "img_size": 32, "truncate_at": "block:2"}}

    class Options(StrictOptions):
        model: str = Field("uni", description=f"Which model: {', '.join(MODELS)}.")
        pretrained: bool = Field(True, description="Its weights from the hub (needs access); false: random init.")
        checkpoint: str | None = Field(None, description="A local copy of its weights (a state dict); no hub needed.")
        img_size: int | None = Field(None, ge=16, description="Input side in pixels (None: the model's, 224).")
        mean: tuple[float, float, float] | None = Field(None, description="Normalisation mean (None: the model's).")
        std: tuple[float, float, float] | None = Field(None, description="Normalisation std (None: the model's).")
        truncate_at: str | None = Field(None, description="Keep the first j blocks: block:j (None: all).")
        pool: Literal["token", "avg", "max"] | None = Field(None, description="Pooling of a cut (None: the model's).")
        final_act: Literal["none"] = Field("none", description="ViT cuts take no final activation.")

        @field_validator("model")
        @classmethod
        def _known(cls, value: str) -> str:
            if value not in MODELS:
                raise ValueError(f"unknown histology model (known: {', '.join(MODELS)})")
            return value

    @property
    def spec(self) -> HistologyModel:
        return MODELS[self.options.model]

    def transform(self) -> InputTransform:
        o, m = self.options, self.spec
        return InputTransform(size=o.img_size or m.img_size, mean=tuple(o.mean or m.mean), std=tuple(o.std or m.std))

    def weights_tag(self) -> str:
        from histobench_timm.encoder import cut_tag

        o = self.options
        if o.checkpoint:
            base = f"file:{Path(o.checkpoint).name}"
        elif o.pretrained:
            base = f"hub:{self.spec.hub_id}"
        else:
            base = f"random:{o.model}"
        return base + cut_tag(o.truncate_at, o.pool, o.final_act)

    def build(self) -> "nn.Module":
        from histobench_timm.encoder import _backbone_class, _create, _load_checkpoint, check_cut_options
        from histobench_timm.truncate import truncate

        o, m = self.options, self.spec
        check_cut_options(o.truncate_at, o.pool, o.final_act)
        ckpt = Path(o.checkpoint).expanduser() if o.checkpoint else None
        if ckpt is not None and not ckpt.is_file():
            raise HistobenchError(f"option encoder.checkpoint: weights file not found: {ckpt}")
        if ckpt is None and o.pretrained:
            model = self._from_hub()
        else:
            kwargs = {"num_classes": 0, **_resolve(m.local_kwargs), "img_size": o.img_size or m.img_size}
            model = _create(m.local_arch, pretrained=False, **kwargs)
            if ckpt is not None:
                _load_checkpoint(model, ckpt)
        if o.truncate_at:
            model = truncate(model, o.truncate_at, o.pool, o.final_act, arch=o.model)
        return _backbone_class()(model)

    def _from_hub(self) -> "nn.Module":
        import timm

        o, m = self.options, self.spec
        kwargs = {"num_classes": 0, **_resolve(m.hub_kwargs)}
        if o.img_size:
            kwargs["img_size"] = o.img_size
        try:
            return timm.create_model(m.hub_id, pretrained=True, **kwargs)
        except Exception as err:  # noqa: BLE001 - offline, gated, missing: all one line naming the way out
            text = str(err).strip()
            reason = text.splitlines()[0][:160] if text else type(err).__name__
            raise HistobenchError(f"encoder 'histology' model {o.model!r}: could not load {m.hub_id} ({type(err).__name__}: "
                                  f"{reason}); it is {m.access}: get access and network, or set "
                                  f"encoder.checkpoint=FILE (a local copy of its weights)") from None


def _resolve(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Class-valued timm kwargs are named by strings in :data:`MODELS` (JSON-able); resolve them."""
    out = dict(kwargs)
    if out.get("mlp_layer") == "swiglu_packed":
        from timm.layers import SwiGLUPacked

        out["mlp_layer"] = SwiGLUPacked
    if out.get("act_layer") == "silu":
        from torch import nn

        out["act_layer"] = nn.SiLU
    return out
