"""Loading a state dict into an encoder strictly, with a one-line account of what does not fit.

``torch.nn.Module.load_state_dict`` raises a multi-line ``RuntimeError`` whose first line ("Error(s) in loading
state_dict for X:") names nothing; users passing a weights file (``histobench extract --weights``,
``histobench analyze --weights``) get instead the missing and unexpected keys and the first shape mismatches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from histobench.errors import HistobenchError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def mismatch(module: "nn.Module", state: Mapping[str, Any]) -> str:
    """What keeps ``state`` from loading strictly into ``module`` (empty when it fits)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing keys {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_few(unexpected)}")
    if shapes:
        parts.append(f"shapes differ: {_few(shapes, 2)}")
    return "; ".join(parts)


def load_strict(module: "nn.Module", state: Any, what: str) -> None:
    """Load ``state`` into ``module`` (every key and shape), or raise one line: ``{what}: <what does not fit>``."""
    if not isinstance(state, Mapping):
        raise HistobenchError(f"{what}: the file does not hold a state dict (got {type(state).__name__})")
    problem = mismatch(module, state)
    if problem:
        raise HistobenchError(f"{what}: {problem}")
    try:
        module.load_state_dict(state)
    except RuntimeError as err:  # e.g. a dtype that cannot be copied
        raise HistobenchError(f"{what}: {' '.join(str(err).split())[:300]}") from None
