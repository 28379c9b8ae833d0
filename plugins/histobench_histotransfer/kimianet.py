"""KimiaNet: a DenseNet-121 trained on TCGA, as a histobench encoder (``kimianet``).

Riasatian et al., "Fine-Tuning and Training of DenseNet for Histopathology Image Representation Using TCGA
Diagnostic Slides", Medical Image Analysis 2021, arXiv:2101.07903 (1000 x 1000 px tiles at 20x, 7,126 TCGA
slides). HistoTransfer (Sharma et al., IEEE BHI 2021, arXiv:2106.07068) compares it with ImageNet networks.

The weights are not on any hub: Kimia Lab distributes ``KimiaNetPyTorchWeights.pth`` on request under an
end-user agreement, so histobench never downloads, ships or caches them; the user names the file with
``-o encoder.weights=PATH``. The file is a ``DataParallel`` state dict: the DenseNet-121 ``features`` under
``module.model.0.`` and a 1024 -> 30 TCGA head under ``module.fc_4.``. :func:`load_kimianet` maps
``module.model.0.*`` to ``features.*``, drops ``module.fc_4.*`` and loads the rest strictly (every encoder key,
every shape). The output is KimiaNet's own extractor's: ``norm5`` average-pooled, without the ReLU that
torchvision's classifier path (and timm's fused ``norm5``) applies, so values can be negative (spec pitfall 3);
``final_act=relu`` restores it. ``truncate_at`` cuts it like any DenseNet (``denseblock3``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from histobench.components import Encoder, InputTransform, StrictOptions
from histobench.errors import HistobenchError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

FEATURE_PREFIXES = ("module.model.0.", "model.0.", "module.features.", "features.")
"""Key prefixes of the DenseNet features in KimiaNet files (DataParallel first; unwrapped saves too)."""
HEAD_PREFIXES = ("module.fc_4.", "fc_4.")
"""KimiaNet's TCGA classifier (30 classes): not part of the encoder."""


class KimiaNet(Encoder):
    """KimiaNet (Riasatian et al. 2021): DenseNet-121 trained on TCGA, from a user-supplied weights file."""

    name = "kimianet"
    presets = {"demo": {"random_init": True, "img_size": 64}}

    class Options(StrictOptions):
        weights: str | None = Field(None, description="KimiaNetPyTorchWeights.pth (from Kimia Lab, under its "
                                    "end-user agreement; never downloaded).")
        random_init: bool = Field(False, description="Build the DenseNet-121 with random weights instead (tests, demo).")
        truncate_at: str = Field("norm5", description="Cut point: norm5 (whole network), denseblock1..4, transition1..3.")
        pool: Literal["avg", "max"] | None = Field(None, description="Pooling of the last map (None: avg).")
        final_act: Literal["none", "relu"] = Field("none", description="none: KimiaNet's extractor (no ReLU after norm5).")
        img_size: int = Field(224, ge=32, description="Input side in pixels (KimiaNet trained on 1000 px at 20x).")
        mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="Normalisation mean (ImageNet's).")
        std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), description="Normalisation std (ImageNet's).")

    def transform(self) -> InputTransform:
        o = self.options
        return InputTransform(size=o.img_size, mean=tuple(o.mean), std=tuple(o.std))

    def weights_tag(self) -> str:
        from histobench_timm.encoder import cut_tag

        o = self.options
        base = f"file:{Path(o.weights).name}" if o.weights else "random"
        return base + cut_tag(o.truncate_at, o.pool, o.final_act)

    def build(self) -> "nn.Module":
        import timm

        from histobench_timm.encoder import _backbone_class
        from histobench_timm.truncate import truncate

        o = self.options
        path = self._weights_path()
        model = timm.create_model("densenet121", pretrained=False, num_classes=0)
        if path is not None:
            load_kimianet(model, path)
        return _backbone_class()(truncate(model, o.truncate_at, o.pool, o.final_act, arch="kimianet"))

    def _weights_path(self) -> Path | None:
        o = self.options
        if o.weights is None:
            if o.random_init:
                return None
            raise HistobenchError("encoder 'kimianet' needs its weights: set -o encoder.weights=/path/to/"
                                  "KimiaNetPyTorchWeights.pth (from Kimia Lab under its end-user agreement; histobench "
                                  "never downloads it), or -o encoder.random_init=true for a random DenseNet-121")
        path = Path(o.weights).expanduser()
        if not path.is_file():
            raise HistobenchError(f"option encoder.weights: KimiaNet weights file not found: {path}")
        return path


def kimianet_state_dict(state: dict[str, Any], source: str = "weights") -> dict[str, Any]:
    """KimiaNet's keys mapped onto a DenseNet's ``features.*``; the TCGA head dropped.

    Raises:
        HistobenchError: keys that are neither DenseNet features nor the head (the first few are named).
    """
    for nest in ("state_dict", "model_state_dict"):
        if isinstance(state.get(nest), dict):
            state = state[nest]
    mapped, unknown = {}, []
    for key, value in state.items():
        prefix = next((p for p in FEATURE_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            mapped["features." + key[len(prefix):]] = value
        elif not key.startswith(HEAD_PREFIXES):
            unknown.append(key)
    if unknown or not mapped:
        raise HistobenchError(f"{source} does not fit KimiaNet: expected keys module.model.0.* (DenseNet-121 features) "
                              f"and module.fc_4.*, found {_few(unknown or sorted(state))}")
    return mapped


def load_kimianet(model: "nn.Module", path: Path) -> dict[str, int]:
    """Load a KimiaNet file into a timm ``densenet121`` (``num_classes=0``), strictly; returns key counts.

    Raises:
        HistobenchError: an unreadable file, or one whose keys or shapes do not fit (one line, naming the file).
    """
    import torch

    source = f"option encoder.weights: {path.name}"
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a user error
        raise HistobenchError(f"{source} could not be read: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}") from None
    if not isinstance(raw, dict):
        raise HistobenchError(f"{source} does not hold a state dict")
    state = kimianet_state_dict(raw, source)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        raise HistobenchError(f"{source} does not fit KimiaNet's DenseNet-121: missing {_few(missing)}, "
                              f"unexpected {_few(unexpected)}, wrong shapes {_few(shapes)}")
    model.load_state_dict(state, strict=True)
    return {"loaded": len(state), "dropped_head": sum(1 for k in raw if str(k).startswith(HEAD_PREFIXES))}


def _few(keys: list[str], n: int = 3) -> str:
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"
