"""HLSS's text-initialised projection heads (the Positive Pairing Module) and the optional adapter.

Watawana et al., MICCAI 2024 (arXiv:2403.14616), spec ``/work/shared/methods/hlss.md`` §2.4 and §3. One
``Linear(d_t -> K_level)`` head per hierarchy level whose weight rows start as the level's text bank (the
attribute embeddings, unit rows) and whose bias starts at 0, all trainable; for a unit input the head's output
``k`` is then the cosine to attribute ``k``. The frozen banks used by the alignment loss are kept as buffers
(a separate copy: they do not follow the trained heads).

When the text encoder does not share the image encoder's space (MiniLM, ``hashing``, a timm backbone with any
text model), a trainable ``Linear(d_v -> d_t)`` adapter (xavier-uniform weight, zero bias) maps the backbone's
embedding into the text space first, and its output is L2-normalised [ours: so that heads and alignment see unit
vectors, as they do with CLIP]. The paper relies on CLIP's joint space and has no adapter: the pretext records
this deviation in the run (``train/deviation_adapter`` = 1 in its logged values, and a warning at setup).
"""

from __future__ import annotations

from histobench.lazy import lazy_attributes, torch_class

LEVELS = ("patch", "slide", "patient")


@torch_class
def _heads_class():
    import torch
    from torch import nn

    class TextHeads(nn.Module):
        """``forward(z [N, d_v]) -> (u [N, d_t], {level: unit head output [N, K_level]})``."""

        def __init__(self, banks: dict[str, torch.Tensor], in_dim: int, adapter: bool):
            super().__init__()
            dims = {b.shape[1] for b in banks.values()}
            if len(dims) != 1:
                raise ValueError(f"text banks of different widths: {sorted(dims)}")
            d_t = dims.pop()
            if not adapter and in_dim != d_t:
                raise ValueError(f"the image embedding ({in_dim}) and the text space ({d_t}) differ: an adapter is needed")
            self.adapter = nn.Linear(in_dim, d_t) if adapter else None
            if self.adapter is not None:
                nn.init.xavier_uniform_(self.adapter.weight)
                nn.init.zeros_(self.adapter.bias)
            self.heads = nn.ModuleDict()
            for lvl in LEVELS:
                bank = banks[lvl].detach().float()
                head = nn.Linear(d_t, bank.shape[0])
                with torch.no_grad():
                    head.weight.copy_(bank)
                    head.bias.zero_()
                self.heads[lvl] = head
                self.register_buffer(f"bank_{lvl}", bank.clone())

        def bank(self, level: str) -> torch.Tensor:
            return getattr(self, f"bank_{level}")

        def embed(self, z: torch.Tensor) -> torch.Tensor:
            if self.adapter is None:
                return z
            return nn.functional.normalize(self.adapter(z), dim=-1)

        def forward(self, z: torch.Tensor):
            u = self.embed(z)
            return u, {lvl: nn.functional.normalize(self.heads[lvl](u), dim=-1) for lvl in LEVELS}

        def activations(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
            """Raw head outputs (attribute activations, before normalisation) per level."""
            u = self.embed(z)
            return {lvl: self.heads[lvl](u) for lvl in LEVELS}

    return TextHeads


__getattr__ = lazy_attributes(__name__, TextHeads=_heads_class)
