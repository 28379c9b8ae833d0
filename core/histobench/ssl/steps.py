"""Per-step helpers of the training loop's pretexts: the augmentation generator and schedule look-ups.

A pretext draws its random views from a generator seeded by ``(run seed, step, rank)`` alone, so a step's
views do not depend on what ran before it (exact resume from a checkpoint) and differ between the ranks of
a DistributedDataParallel run. The seed goes through numpy's ``SeedSequence``, which mixes the three
integers into well-spread 64-bit state (nearby steps get unrelated streams).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A non-negative 63-bit integer derived from ``(seed, step, rank)``."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(1, np.uint64)[0] >> 1)


def step_generator(seed: int, step: int, rank: int = 0, device: "torch.device | str" = "cpu") -> "torch.Generator":
    """A ``torch.Generator`` on ``device`` seeded with :func:`step_seed` (the same on every call)."""
    import torch

    return torch.Generator(device=device).manual_seed(step_seed(seed, step, rank))


def value_at(schedule: Sequence[float], step: int) -> float:
    """``schedule[step]`` as a float, with ``step`` clamped into the schedule (past the end: its last value)."""
    return float(schedule[min(max(int(step), 0), len(schedule) - 1)])


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: float, steps_per_epoch: int,
                          total_steps: int):
    """DINO's teacher temperature per step: linear from ``warmup_temp`` to ``temp`` over ``warmup_epochs``, then
    constant (numpy array of ``max(total_steps, 1)`` values)."""
    import numpy as np

    total = max(int(total_steps), 1)
    warm = min(int(round(warmup_epochs * steps_per_epoch)), total)
    return np.concatenate([np.linspace(warmup_temp, temp, warm), np.full(total - warm, temp)])
