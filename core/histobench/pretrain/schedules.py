"""Per-step schedules, precomputed as arrays (the DINO way): learning rate, weight decay, EMA momentum."""

from __future__ import annotations

import math

import numpy as np


def cosine_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``start`` over ``warmup_steps``, then a cosine from ``start`` to ``end``.

    Returns ``total_steps`` values; ``[0]`` is the value at the first step, ``[-1]`` equals ``end`` (when there
    are steps after the warm-up).
    """
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    warm = np.linspace(warmup_start, start, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    n = total_steps - warmup_steps
    if n == 1:
        body = np.array([start])
    else:
        t = np.arange(n) / max(n - 1, 1)
        body = end + 0.5 * (start - end) * (1 + np.cos(math.pi * t))
    return np.concatenate([warm, body]).astype(np.float64)
