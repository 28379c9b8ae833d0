"""``clip-rn50``: the CLIP ResNet-50 image tower that HLSS fine-tunes, through timm.

HLSS (Watawana et al., MICCAI 2024, arXiv:2403.14616; spec ``/work/shared/methods/hlss.md`` §2.2) starts from
open_clip's ``RN50-quickgelu`` trained on CC12M; timm hosts the same image tower as ``resnet50_clip.cc12m``.
Keeping timm's 1024-wide head (``num_classes=1024``) keeps CLIP's attention pooling and projection, so the
embedding is the 1024-d CLIP image embedding that the ``openclip`` text encoder shares a space with (``num_classes=0``
would drop the attention pool and give 2048-d average-pooled features). Normalisation: CLIP's mean and std
(the released code feeds [0, 1] pixels without any, spec P7). The ``demo`` preset is a small random-init CNN
(timm ``resnet10t`` at 64 px) for CPU runs; it shares no space with any text encoder, so HLSS adds its adapter.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from histobench_timm.encoder import TimmEncoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipRN50(TimmEncoder):
    """CLIP ResNet-50 image tower (CC12M weights via timm resnet50_clip.cc12m), 1024-d attention-pooled embedding."""

    name = "clip-rn50"
    presets = {"demo": {"arch": "resnet10t", "pretrained": False, "model_kwargs": {}, "img_size": 64}}

    class Options(TimmEncoder.Options):
        arch: str = Field("resnet50_clip.cc12m", description="timm model name (HLSS: CLIP RN50 image tower, CC12M).")
        pretrained: bool = Field(True, description="Load the CC12M weights from the hub (or set encoder.checkpoint).")
        model_kwargs: dict[str, Any] = Field(default_factory=lambda: {"num_classes": 1024},
                                             description="Extra timm.create_model kwargs (1024: keep CLIP's attention pool).")
        mean: tuple[float, float, float] = Field(CLIP_MEAN, description="Normalisation mean (CLIP).")
        std: tuple[float, float, float] = Field(CLIP_STD, description="Normalisation std (CLIP).")

    def build(self):
        module = super().build()
        head_width = int(getattr(module.model, "num_classes", 0) or 0)
        if head_width:  # the attention-pooled projection is the embedding (its feature-map tokens stay 2048-d)
            module.embed_dim = head_width
        return module
