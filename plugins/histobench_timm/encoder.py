"""Any timm image model as a histobench encoder.

Wightman, "PyTorch Image Models", https://github.com/huggingface/pytorch-image-models. The model is made by
``timm.create_model(arch, num_classes=0, ...)`` so that ``forward`` returns timm's pooled pre-logits
features (the class token for a ViT, global average pooling for a CNN) and ``forward_features`` the token
or feature map. ViTs are built with ``dynamic_img_size=True`` so that one encoder takes the global and the
local crops of multi-crop pretexts (DINO); models that do not take ``img_size``/``dynamic_img_size`` are
built without them.

Weights: random (default), the hub (``pretrained=True``; needs network access on first use), or a local
file (``checkpoint``): a state dict in ``.pth``/``.pt``/``.bin``/``.safetensors``, possibly nested under
``state_dict``/``model``/``teacher`` and prefixed by ``module.``/``backbone.``/``model.``; it passes the
architecture's timm ``checkpoint_filter_fn`` (e.g. position-embedding resizing) and must then match the
model exactly (the classifier head is ignored). Hub ids (``hf-hub:org/name``) are accepted as ``arch``.

Truncation (HistoTransfer, Sharma et al., IEEE BHI 2021, arXiv:2106.07068): ``truncate_at`` cuts the network
after a named stage or block (``layer3``, ``denseblock3``, ``block:6``; :mod:`histobench_timm.truncate`), after
its weights are loaded, with ``pool`` and ``final_act``. The cut is part of :meth:`TimmEncoder.weights_tag`, so
two cuts of the same weights never share cached features (the pooling and the activation do not change the
state dict, hence its hash).
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from histobench.components import Encoder, InputTransform, StrictOptions
from histobench.errors import HistobenchError
from histobench.lazy import lazy_attributes, torch_class

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

_OPTIONAL_KWARGS = ("img_size", "dynamic_img_size")
_NESTING = ("state_dict", "model", "teacher", "module")
_PREFIXES = ("module.", "backbone.", "model.", "encoder.")


class TimmEncoder(Encoder):
    """A timm model (``timm.create_model``) with pooled features; random, hub or local-file weights."""

    name = "timm"
    presets = {
        "demo": {
            "arch": "vit_small_patch16_224",
            "model_kwargs": {"patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3},
            "img_size": 64,
        }
    }

    class Options(StrictOptions):
        arch: str = Field("vit_small_patch16_224", description="timm model name (timm.list_models()).")
        pretrained: bool = Field(False, description="Load timm's pretrained weights from the hub.")
        checkpoint: str | None = Field(None, description="Local weights file (a state dict); overrides the hub.")
        img_size: int = Field(224, ge=8, description="Input side in pixels.")
        model_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra timm.create_model kwargs.")
        dynamic_img_size: bool = Field(True, description="ViTs accept any input size (interpolated positions).")
        mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="Normalisation mean (RGB).")
        std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), description="Normalisation std (RGB).")
        truncate_at: str | None = Field(None, description="Cut after this stage or block (layer3, denseblock3, "
                                        "block:6); None keeps the whole network.")
        pool: Literal["avg", "max", "token"] | None = Field(None, description="Pooling of a cut: avg (CNN default), "
                                                            "max, or token (ViT default: the class token).")
        final_act: Literal["none", "relu"] = Field("none", description="Activation on a cut's map before pooling; "
                                                    "none also drops a fused one (timm DenseNet norm5).")

    def transform(self) -> InputTransform:
        return InputTransform(size=self.options.img_size, mean=tuple(self.options.mean), std=tuple(self.options.std))

    def weights_tag(self) -> str:
        o = self.options
        if o.checkpoint:
            tag = f"file:{Path(o.checkpoint).name}"
        elif o.pretrained:
            tag = f"hub:{o.arch}"
        else:
            tag = "random"
        return tag + cut_tag(o.truncate_at, o.pool, o.final_act)

    def check(self) -> None:
        """The architecture exists, the checkpoint file is there, and a cut names one of the architecture's
        cut points (read from the model built on the meta device: no memory, no weights)."""
        import timm

        o = self._check_options()
        if o.truncate_at and timm.is_model(o.arch):
            import torch

            from histobench_timm.truncate import check_cut

            kwargs = {"num_classes": 0, **o.model_kwargs, "img_size": o.img_size}
            with torch.device("meta"):
                check_cut(_create(o.arch, pretrained=False, **kwargs), o.truncate_at, o.arch)

    def _check_options(self) -> "TimmEncoder.Options":
        """What needs no model: the cut's options, the architecture's name, the checkpoint file."""
        import timm

        o = self.options
        check_cut_options(o.truncate_at, o.pool, o.final_act)
        if not (timm.is_model(o.arch) or o.arch.startswith(HUB_PREFIXES)):
            close = difflib.get_close_matches(o.arch, timm.list_models(), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
            raise HistobenchError(f"unknown timm architecture {o.arch!r}{hint}")
        ckpt = Path(o.checkpoint).expanduser() if o.checkpoint else None
        if ckpt is not None and not ckpt.is_file():
            raise HistobenchError(f"encoder checkpoint file not found: {ckpt}")
        return o

    def build(self) -> "nn.Module":
        o = self._check_options()  # the cut itself is checked by truncate(), on the real model
        ckpt = Path(o.checkpoint).expanduser() if o.checkpoint else None
        kwargs = {"num_classes": 0, **o.model_kwargs, "img_size": o.img_size}
        if o.dynamic_img_size:
            kwargs["dynamic_img_size"] = True
        model = _create(o.arch, pretrained=o.pretrained and ckpt is None, **kwargs)
        if ckpt is not None:
            _load_checkpoint(model, ckpt)
        if o.truncate_at:
            from histobench_timm.truncate import truncate

            model = truncate(model, o.truncate_at, o.pool, o.final_act, arch=o.arch)
        return _backbone_class()(model)


HUB_PREFIXES = ("hf-hub:", "hf_hub:")


def cut_tag(truncate_at: str | None, pool: str | None, final_act: str) -> str:
    """What a cut adds to a weights tag: ``@layer3``, ``@denseblock3+relu``, ``@block:6+avg`` (empty for none)."""
    if not truncate_at:
        return ""
    return f"@{truncate_at}" + (f"+{pool}" if pool else "") + ("+relu" if final_act == "relu" else "")


def check_cut_options(truncate_at: str | None, pool: str | None, final_act: str) -> None:
    """``pool`` and ``final_act`` shape a cut: without ``truncate_at`` they are an error, not silently ignored."""
    if not truncate_at and (pool is not None or final_act != "none"):
        raise HistobenchError("options encoder.pool and encoder.final_act apply to a cut: set encoder.truncate_at "
                              "(e.g. layer4 for a whole ResNet, norm5 for a whole DenseNet)")


def _create(arch: str, pretrained: bool, **kwargs: Any):
    """``timm.create_model``, dropping optional kwargs the architecture does not take."""
    import timm

    while True:
        try:
            return timm.create_model(arch, pretrained=pretrained, **kwargs)
        except TypeError as err:
            bad = [k for k in _OPTIONAL_KWARGS if k in kwargs and f"'{k}'" in str(err)]
            if not bad:
                hint = "; clear the ViT kwargs with -o encoder.model_kwargs={}" if "patch_size" in kwargs else ""
                raise HistobenchError(f"timm could not build {arch!r} with {kwargs}: {err}{hint}") from None
            for k in bad:
                kwargs.pop(k)
        except (OSError, RuntimeError, ValueError) as err:  # the hub: offline, gated, missing, or a bad file
            if not (pretrained or arch.startswith(HUB_PREFIXES)):
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise HistobenchError(
                f"could not load pretrained weights for {arch!r} from the hub ({first}); "
                f"download them once with network access or pass encoder.checkpoint=FILE"
            ) from None


def _read_state_dict(path: Path) -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is a user error
            raise HistobenchError(f"could not read encoder checkpoint {path}: {err}") from None
    for key in _NESTING:  # unwrap training checkpoints
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise HistobenchError(f"encoder checkpoint {path} does not hold a state dict")
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_checkpoint(model, path: Path) -> None:
    state = _read_state_dict(path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception:  # noqa: BLE001 - a filter that does not understand the layout: load as is
            pass
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(("head.", "fc.", "classifier."))}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise HistobenchError(
            f"encoder checkpoint {path} does not match the model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise HistobenchError(f"encoder checkpoint {path} does not match the model: {first}") from None


@torch_class
def _backbone_class() -> type:
    from torch import nn

    class TimmBackbone(nn.Module):
        """A timm model with ``embed_dim``, ``forward(x) -> [B, D]`` and the token contract of dense methods.

        ``forward_tokens(x) -> [B, T, D]`` (after the final norm) starts with ``num_prefix_tokens`` class and
        register tokens (0 for a CNN's feature map, whose cells are the tokens, row-major); the rest are the
        patches, ``token_grid(x) -> (h, w)`` of them, also served alone by ``patch_tokens(x) -> [B, h*w, D]``.
        ViTs add ``cls_attention(x) -> [B, heads, h*w]`` (:func:`histobench.ssl.attention.vit_cls_attention`).
        """

        def __init__(self, model: nn.Module):
            super().__init__()
            self.model = model
            self.embed_dim = int(model.num_features)
            self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
            self.arch = str(getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__)
            self._grids: dict[tuple[int, int], tuple[int, int]] = {}

        def forward(self, x):
            return self.model(x)

        def forward_tokens(self, x):
            tokens = self.model.forward_features(x)
            if tokens.ndim == 4:  # a feature map -> [B, h*w, D]: timm's NHWC models say so in output_fmt
                nhwc = str(getattr(self.model, "output_fmt", "NCHW")) == "NHWC"
                tokens = tokens.flatten(1, 2) if nhwc else tokens.flatten(2).transpose(1, 2)
            return tokens

        def patch_tokens(self, x):
            """``[B, h*w, D]``: the patch (or feature-map cell) tokens, prefix tokens dropped."""
            return self.forward_tokens(x)[:, self.num_prefix_tokens:]

        def token_grid(self, x) -> tuple[int, int]:
            """``(h, w)``, the patch grid of ``forward_tokens`` for an input of ``x``'s size (any size a dynamic ViT takes)."""
            size = (int(x.shape[-2]), int(x.shape[-1]))
            patch_embed = getattr(self.model, "patch_embed", None)
            if hasattr(self.model, "num_prefix_tokens") and hasattr(patch_embed, "dynamic_feat_size"):
                # ViTs: from the patch size (and padding), no forward; hierarchical models (Swin) are measured
                return tuple(int(v) for v in patch_embed.dynamic_feat_size(size))
            if size not in self._grids:  # other models: measure once per input size on one probe image
                import torch

                with torch.no_grad():
                    out = self.model.forward_features(x[:1])
                if out.ndim != 4:
                    raise HistobenchError(f"encoder architecture {self.arch!r} gives tokens without a known patch grid")
                nhwc = str(getattr(self.model, "output_fmt", "NCHW")) == "NHWC"
                self._grids[size] = (int(out.shape[1]), int(out.shape[2])) if nhwc else (int(out.shape[2]), int(out.shape[3]))
            return self._grids[size]

        def cls_attention(self, x):
            """``[B, heads, h*w]``: the last block's [CLS]→patch attention, rows summing to 1 (ViTs only)."""
            from histobench.ssl.attention import vit_cls_attention

            return vit_cls_attention(self.model, x, name=f"encoder architecture {self.arch!r}")

        def set_drop_path(self, rate: float) -> bool:
            """Stochastic depth with timm's linear decay rule over the blocks (``rate`` at the last one).

            Returns False when the model has no ``blocks`` with ``drop_path1``/``drop_path2`` (then it is unchanged).
            """
            from timm.layers import DropPath

            blocks = list(getattr(self.model, "blocks", []))
            if not blocks or not all(hasattr(b, "drop_path1") and hasattr(b, "drop_path2") for b in blocks):
                return False
            n = len(blocks)
            for i, block in enumerate(blocks):
                r = rate * i / max(n - 1, 1)
                block.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
                block.drop_path2 = DropPath(r) if r > 0 else nn.Identity()
            return True

    return TimmBackbone


__getattr__ = lazy_attributes(__name__, TimmBackbone=_backbone_class)  # pickles as {module}.TimmBackbone
