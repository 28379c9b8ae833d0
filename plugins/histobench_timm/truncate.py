"""Cutting a timm network after a named stage or block, as HistoTransfer does.

Sharma, Ehsan, Syed and Brown, "HistoTransfer: Understanding Transfer Learning for Histopathology", IEEE BHI
2021, arXiv:2106.07068 (method spec ``histotransfer.md`` §2.2, §3, pitfalls 3-4). Earlier blocks of an ImageNet
network may describe tissue as well as the whole network does; the paper keeps a network's top-level modules
in order up to and including a named block and average-pools the last map to a vector.

* **CNNs.** The cut points are the model's top-level children in order, without its head (``global_pool``,
  ``fc``, ``classifier``, ...): ResNet ``conv1 bn1 act1 maxpool layer1..layer4``. A ``features`` container
  (DenseNet, VGG) is cut inside, by its children's names (DenseNet ``conv0 ... denseblock1 transition1 ...
  denseblock4 norm5``); ``stages``/``layers``/``blocks`` containers (ConvNeXt, EfficientNet) are cut as
  ``stages.i``. The kept modules keep their names, so a cut's state dict is a subset of the whole
  network's. The map is then pooled (``avg``, the paper's, or ``max``), always explicitly (pitfall 4).
  Whether the children compose to the network's own ``forward_features`` is checked once when the cut is
  made, on a small probe image; an architecture whose forward does more (position embeddings, permutes)
  cannot be cut this way and says so.
* **Final activation (pitfall 3).** ``final_act="none"`` (the paper's) appends nothing and, where the cut ends
  in a normalisation layer with a fused activation (timm's DenseNet ``norm5`` is BatchNorm + ReLU, unlike
  torchvision's), removes that activation: DenseNet's pooled ``norm5`` can then be negative, as in the
  paper's truncation and KimiaNet's extractor. ``"relu"`` applies a ReLU to the map before pooling
  (torchvision's DenseNet classifier path).
* **ViTs** (``block:j``, ours, spec §3): the first ``j`` transformer blocks, then the network's final norm and
  its own pooling (the class token), or ``avg``/``max`` over the patch tokens. The model stays a timm
  ``VisionTransformer``, so tokens and [CLS] attention (now of block ``j``) work as before.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from histobench.errors import HistobenchError
from histobench.lazy import lazy_attributes, torch_class

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

HEAD_CHILDREN = frozenset({"global_pool", "fc", "head", "head_drop", "classifier", "pre_logits", "fc_norm", "flatten",
                           "drop", "dropout"})
CUT_INSIDE = ("features",)  # containers cut by their children's own names
CUT_INDEXED = ("stages", "layers", "blocks")  # containers cut as name.i
_VIT_CUT = re.compile(r"^block:(\d+)$")
PROBE_SIZE = 64


def is_vit(model: "nn.Module") -> bool:
    """A timm ViT-like model: patch embedding, a list of blocks and prefix tokens."""
    return all(hasattr(model, a) for a in ("patch_embed", "blocks", "num_prefix_tokens"))


def cut_points(model: "nn.Module") -> list[str]:
    """The names a model can be cut at, in order (``block:1..block:depth`` for a ViT)."""
    if is_vit(model):
        return [f"block:{j}" for j in range(1, len(model.blocks) + 1)]
    return [name for name, _ in _pieces(model)]


def _pieces(model: "nn.Module") -> list[tuple[str, tuple[str, str | None]]]:
    """``(cut name, (top-level child, sub-child or None))`` in forward order."""
    from torch import nn

    out = []
    for name, child in model.named_children():
        if name in HEAD_CHILDREN:
            continue
        if name in CUT_INSIDE + CUT_INDEXED and isinstance(child, nn.Sequential) and len(child) > 0:
            for sub, _ in child.named_children():
                out.append((sub if name in CUT_INSIDE else f"{name}.{sub}", (name, sub)))
        else:
            out.append((name, (name, None)))
    return out


def check_cut(model: "nn.Module", cut: str, arch: str) -> int:
    """The index of ``cut`` among ``model``'s cut points (:func:`cut_points`); an unknown cut is a one-line
    error listing the valid ones. Reads only the module tree, so a model on the meta device will do."""
    names = cut_points(model)
    if is_vit(model):
        m = _VIT_CUT.match(cut)
        if m is None or not 1 <= int(m.group(1)) <= len(names):
            raise HistobenchError(f"option encoder.truncate_at={cut!r}: ViT {arch!r} is cut as block:j "
                                  f"(valid: block:1 ... block:{len(names)})")
        return int(m.group(1)) - 1
    if cut not in names:
        raise HistobenchError(f"option encoder.truncate_at={cut!r}: architecture {arch!r} has no such cut point "
                              f"(valid: {', '.join(names)})")
    return names.index(cut)


def truncate(model: "nn.Module", cut: str, pool: str | None = None, final_act: str = "none",
             arch: str | None = None) -> "nn.Module":
    """``model`` cut after ``cut``, pooled and with ``final_act``: a module with ``forward_features`` (the map
    or tokens before pooling), ``forward`` (``[B, D]``) and ``num_features`` (``D``).

    Raises:
        HistobenchError: the architecture has no cut point ``cut`` (the message lists the valid ones), a
            pooling it does not offer, or children that do not compose to its forward.
    """
    arch = arch or type(model).__name__
    if is_vit(model):
        return _truncate_vit(model, cut, pool, final_act, arch)
    if pool not in (None, "avg", "max"):
        raise HistobenchError(f"option encoder.pool={pool!r}: a CNN cut pools its map with 'avg' or 'max'")
    pieces = _pieces(model)
    index = check_cut(model, cut, arch)
    channels = _probe(model, pieces, index, arch)
    kept = pieces[: index + 1]
    if final_act == "none":
        _strip_fused_act(_module_at(model, kept[-1][1]))
    parts: dict[str, Any] = {}
    for _, (top, sub) in kept:
        if sub is None:
            parts[top] = getattr(model, top)
        else:
            parts.setdefault(top, []).append((sub, getattr(getattr(model, top), sub)))
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    cfg.setdefault("architecture", arch)
    return _truncated_class()(parts, channels, pool or "avg", final_act, cut, cfg)


def _module_at(model: "nn.Module", path: tuple[str, str | None]) -> "nn.Module":
    top, sub = path
    module = getattr(model, top)
    return module if sub is None else getattr(module, sub)


def _strip_fused_act(module: "nn.Module") -> None:
    """Remove the activation a timm norm-act layer applies after normalising (DenseNet's ``norm5``)."""
    from torch import nn

    last = module
    while not hasattr(last, "act") and len(list(last.children())) > 0 and isinstance(last, nn.Sequential):
        last = list(last.children())[-1]
    if type(last).__name__.endswith("NormAct2d") and hasattr(last, "act"):
        last.act = nn.Identity()


_PROBED: dict[tuple, list[int | None]] = {}  # architecture (class, name, parameter shapes) -> channels per piece


def _probe(model: "nn.Module", pieces, index: int, arch: str) -> int:
    """Run the children in order on one probe image: their composition must equal ``forward_features``;
    returns the channels of the map at the cut. Done once per architecture and process."""
    key = (type(model).__qualname__, arch, tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))
    if key not in _PROBED:
        _PROBED[key] = _probe_channels(model, pieces, arch)
    channels = _PROBED[key][index]
    if channels is None:
        raise HistobenchError(f"architecture {arch!r} gives no feature map at {pieces[index][0]!r}; it cannot be cut there")
    return channels


def _probe_channels(model: "nn.Module", pieces, arch: str) -> list[int | None]:
    import torch

    was_training = model.training
    model.eval()
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, int(getattr(model, "in_chans", 3) or 3), PROBE_SIZE, PROBE_SIZE, generator=g)
        with torch.no_grad():
            ref = model.forward_features(x.clone())
            y, channels = x, []
            for _, path in pieces:
                y = _module_at(model, path)(y)
                channels.append(int(y.shape[1]) if y.ndim == 4 else None)
    finally:
        model.train(was_training)
    if y.shape != ref.shape or not torch.allclose(y, ref, rtol=1e-4, atol=1e-5):
        raise HistobenchError(f"architecture {arch!r} cannot be cut by its children (its forward does more than "
                              f"run them in order); truncation supports ResNet/DenseNet-style CNNs and ViTs (block:j)")
    return channels


def _truncate_vit(model: "nn.Module", cut: str, pool: str | None, final_act: str, arch: str) -> "nn.Module":
    kept = check_cut(model, cut, arch) + 1  # blocks 1 .. j
    if final_act != "none":
        raise HistobenchError(f"option encoder.final_act={final_act!r}: ViT cuts take final_act=none")
    if pool not in (None, "token", "avg", "max"):
        raise HistobenchError(f"option encoder.pool={pool!r}: a ViT cut pools with 'token', 'avg' or 'max'")
    model.blocks = model.blocks[:kept]
    if pool is not None:
        if pool == "token" and getattr(model, "cls_token", None) is None:
            raise HistobenchError(f"option encoder.pool='token': ViT {arch!r} has no class token")
        model.reset_classifier(0, global_pool=pool)
    return model


@torch_class
def _truncated_class() -> type:
    from collections import OrderedDict

    from torch import nn

    class TruncatedCNN(nn.Module):
        """A CNN's children up to a cut (their original names), an optional ReLU and global pooling.

        ``forward_features(x) -> [B, C, h, w]`` (after ``final_act``), ``forward(x) -> [B, C]``.
        """

        def __init__(self, parts: dict, channels: int, pool: str, final_act: str, cut: str, cfg: dict):
            super().__init__()
            self.order = list(parts)
            for name, part in parts.items():
                self.add_module(name, nn.Sequential(OrderedDict(part)) if isinstance(part, list) else part)
            self.final_act = nn.ReLU() if final_act == "relu" else nn.Identity()
            self.pool, self.cut = pool, cut
            self.num_features = int(channels)
            self.pretrained_cfg = cfg

        def forward_features(self, x):
            for name in self.order:
                x = self._modules[name](x)
            return self.final_act(x)

        def forward(self, x):
            x = self.forward_features(x)
            return x.mean(dim=(2, 3)) if self.pool == "avg" else x.amax(dim=(2, 3))

    return TruncatedCNN


__getattr__ = lazy_attributes(__name__, TruncatedCNN=_truncated_class)  # pickles as {module}.TruncatedCNN
