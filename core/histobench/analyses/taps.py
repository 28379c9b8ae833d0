"""Named intermediate activations of any encoder module ("layer taps"), each reduced to one row per input.

:class:`LayerTaps` puts a forward hook on each named submodule of an ``nn.Module`` and returns, for one
forward pass, ``{layer: [B, F]}``: the submodule's output reduced by ``reduce``. ``avgpool`` (the default)
averages a ``[B, C, H, W]`` map over its positions (NCHW, as timm CNNs return it) and a ``[B, T, D]`` token
sequence over its tokens. ``flatten`` keeps every value (``C·H·W``). The special layer :data:`EMBEDDING` is
the module's own output, the pooled encoder vector.

Which layers when none are named: :func:`default_layers`, the one place that knows architecture families.
The stem and each stage of a ResNet (``layer1..4``, or every residual block with ``depth="blocks"``), the
stem and each dense block and transition of a DenseNet, each block of a ViT, and otherwise timm's
``feature_info`` modules or the top-level children. Wrappers with a single child (histobench's
``TimmBackbone`` holds the timm model as ``model``) are looked through, and layers are shown relative to the
wrapped model (``layer1``, not ``model.layer1``).

Named layers (``resolve_layers``) may be written either way; an unknown name is one
:class:`~histobench.errors.HistobenchError` that names the encoder and suggests close names. A named layer
that the forward pass never reaches (a truncated encoder) is an error too; a default one is dropped.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from histobench.errors import HistobenchError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

EMBEDDING = "embedding"
REDUCTIONS = ("avgpool", "flatten")
DEPTHS = ("stages", "blocks")


def wrapped_model(module: "nn.Module") -> tuple[str, "nn.Module"]:
    """``(prefix, inner)``: ``module`` with every single-child wrapper looked through (``"model."``, timm model)."""
    prefix, inner = "", module
    while True:
        children = list(inner.named_children())
        if len(children) != 1 or any(True for _ in inner.parameters(recurse=False)):
            return prefix, inner
        name, inner = children[0]
        prefix += name + "."


def default_layers(module: "nn.Module", depth: str = "stages") -> list[str]:
    """The layers a CKA compares by default: module paths from ``module`` (see the module docstring)."""
    from torch import nn

    prefix, core = wrapped_model(module)
    names = dict(core.named_modules())
    if all(f"layer{i}" in names for i in range(1, 5)):  # ResNet family: stem, then stages or residual blocks
        stem = [n for n in ("maxpool", "act1", "relu") if n in names][:1]
        if depth == "blocks":
            stages = [f"layer{i}.{j}" for i in range(1, 5) for j, _ in names[f"layer{i}"].named_children()]
        else:
            stages = [f"layer{i}" for i in range(1, 5)]
        rel = stem + stages
    elif "features.denseblock1" in names:  # DenseNet: stem, then each dense block and transition
        stem = [n for n in ("features.pool0", "features.norm0") if n in names][:1]
        rel = stem + [f"features.{n}" for n, _ in names["features"].named_children()
                      if n.startswith(("denseblock", "transition"))]
    elif isinstance(getattr(core, "blocks", None), (nn.Sequential, nn.ModuleList)) and hasattr(core, "patch_embed"):
        rel = [f"blocks.{i}" for i in range(len(core.blocks))]  # ViT: each block's output
    elif getattr(core, "feature_info", None):  # other timm models: the stages timm itself exposes
        rel = [str(f["module"]) for f in core.feature_info if str(f.get("module", "")) in names]
    else:
        rel = [n for n, _ in core.named_children()]
    return [prefix + r for r in rel]


def display_name(module: "nn.Module", path: str) -> str:
    """``path`` relative to the wrapped model (``model.layer1`` -> ``layer1``)."""
    prefix, _ = wrapped_model(module)
    return path[len(prefix):] if prefix and path.startswith(prefix) else path


def resolve_layers(module: "nn.Module", names: list[str], encoder: str) -> list[str]:
    """Module paths for user-given layer names (full paths or relative to the wrapped model; ``embedding``)."""
    prefix, _ = wrapped_model(module)
    known = dict(module.named_modules())
    out = []
    for name in names:
        if name == EMBEDDING:
            out.append(EMBEDDING)
        elif name and name in known:
            out.append(name)
        elif name and prefix + name in known:
            out.append(prefix + name)
        else:
            short = [display_name(module, n) for n in known if n]
            close = difflib.get_close_matches(name, short, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; e.g. {', '.join(short[:4])}"
            raise HistobenchError(f"layer {name!r} is not a module of encoder {encoder!r}{hint}")
    if len(set(out)) != len(out):
        raise HistobenchError(f"encoder {encoder!r}: a layer is named twice in {','.join(names)}")
    return out


def reduce_activation(t: "torch.Tensor", reduce: str = "avgpool") -> "torch.Tensor":
    """``[B, ...]`` -> ``[B, F]``: ``avgpool`` averages maps over H, W and token sequences over tokens;
    ``flatten`` keeps every value."""
    if reduce not in REDUCTIONS:
        raise HistobenchError(f"unknown reduce {reduce!r}; choose {' or '.join(REDUCTIONS)}")
    if t.ndim <= 2:
        return t.reshape(len(t), -1)
    if reduce == "flatten":
        return t.flatten(1)
    if t.ndim == 3:  # [B, T, D] tokens
        return t.mean(dim=1)
    return t.flatten(2).mean(dim=2)  # [B, C, H, W] (or more spatial dims) -> [B, C]


def _first_tensor(output: Any) -> Any:
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    if isinstance(output, dict):
        for item in output.values():
            if isinstance(item, torch.Tensor):
                return item
    return None


class LayerTaps:
    """Forward hooks on ``layers`` (module paths, or :data:`EMBEDDING`) of ``module``.

    ``taps(x)`` runs ``module(x)`` under inference mode and returns ``{path: [B, F] float32}`` in ``layers``'
    order. Use as a context manager (or call :meth:`close`) to remove the hooks.
    """

    def __init__(self, module: "nn.Module", layers: list[str], reduce: str = "avgpool"):
        if reduce not in REDUCTIONS:
            raise HistobenchError(f"unknown reduce {reduce!r}; choose {' or '.join(REDUCTIONS)}")
        self.module, self.layers, self.reduce = module, list(layers), reduce
        self._seen: dict[str, Any] = {}
        self._handles = []
        modules = dict(module.named_modules())
        for path in self.layers:
            if path == EMBEDDING:
                continue
            if path not in modules:
                raise HistobenchError(f"layer {path!r} is not a module of {type(module).__name__}")
            self._handles.append(modules[path].register_forward_hook(self._hook(path)))

    def _hook(self, path: str):
        def hook(_module, _inputs, output):
            t = _first_tensor(output)
            if t is not None:
                self._seen[path] = reduce_activation(t.detach(), self.reduce).float()

        return hook

    def __call__(self, x: "torch.Tensor") -> dict[str, "torch.Tensor"]:
        import torch

        self._seen = {}
        with torch.inference_mode():
            out = self.module(x)
        if EMBEDDING in self.layers:
            t = _first_tensor(out)
            if t is None:
                raise HistobenchError(f"{type(self.module).__name__}'s forward returns no tensor to use as the embedding")
            self._seen[EMBEDDING] = reduce_activation(t.detach(), "avgpool").float()
        missing = [p for p in self.layers if p not in self._seen]
        if missing:
            raise HistobenchError(f"layers {', '.join(missing)} of {type(self.module).__name__} did not run in its forward "
                                  "pass (a truncated encoder?); name layers that run")
        seen, self._seen = self._seen, {}
        return {p: seen[p] for p in self.layers}

    def reached(self, x: "torch.Tensor") -> list[str]:
        """Which of ``layers`` a forward pass of ``x`` reaches (to drop default layers a truncated model skips)."""
        import torch

        self._seen = {}
        with torch.inference_mode():
            self.module(x)
        reached = [p for p in self.layers if p == EMBEDDING or p in self._seen]
        self._seen = {}
        return reached

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "LayerTaps":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
