"""``hashing``: a deterministic, dependency-free text encoder for tests and offline demos.

Each word (lower-cased, split on non-letters) and each pair of adjacent words gets a pseudo-random
Gaussian vector seeded by the SHA-256 of the text; a sentence is the sum of its vectors, L2-normalised.
Sentences that share words are therefore close, identical sentences identical, and nothing is downloaded.
It does not share a space with any image encoder. It is not a language model: use it to exercise code paths.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

from pydantic import Field

from histobench.components import StrictOptions, TextEncoder

if TYPE_CHECKING:  # pragma: no cover
    import torch

_WORD = re.compile(r"[a-z0-9]+")


class HashingTextEncoder(TextEncoder):
    """Deterministic hashed bag of words and word pairs; unit rows; for tests and offline demos only."""

    name = "hashing"
    shares_image_space = False

    class Options(StrictOptions):
        dim: int = Field(64, ge=2, description="Output width.")
        max_words: int = Field(77, ge=1, description="Longest accepted sentence, in words (CLIP's context is 77 tokens).")

    @property
    def dim(self) -> int:
        return self.options.dim

    @property
    def max_tokens(self) -> int:
        return self.options.max_words

    def count_tokens(self, text: str) -> int:
        return len(_WORD.findall(text.lower()))

    def identity(self) -> str:
        return f"hashing-v1-d{self.options.dim}"

    def _vector(self, key: str):
        import numpy as np

        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.options.dim)

    def encode(self, texts: list[str]) -> "torch.Tensor":
        import numpy as np
        import torch

        rows = []
        for text in texts:
            words = _WORD.findall(str(text).lower())
            keys = words + [f"{a} {b}" for a, b in zip(words, words[1:])] or ["<empty>"]
            v = np.sum([self._vector(k) for k in keys], axis=0)
            rows.append(v / max(np.linalg.norm(v), 1e-12))
        return torch.as_tensor(np.array(rows, dtype=np.float32).reshape(len(texts), self.options.dim))
