"""Named evaluation protocols: what a protocol receives, and the default one, ``frozen-mil``.

A protocol (:class:`histobench.components.Protocol`) turns a task's slides into metrics over the task's
fixed folds. The core resolves everything it needs before it runs and hands it over as
:class:`ProtocolInputs`: the task, the manifest, the splits (made before any pretraining, with their
validation side), the aggregator, the shared evaluation policy, and the inputs the protocol declared:
``features`` (cached per-slide features) and/or ``tiles`` plus ``encoder`` (the slides' tiles and the
encoder module, for protocols that train or re-extract the encoder inside each fold). Protocols return an
:class:`~histobench.evaluate.protocol.EvalResult`; the metrics, the statistics and the logging are the core's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from histobench.components import Protocol, StrictOptions

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pandas as pd

    from histobench.cohorts.splits import Splits
    from histobench.components import Aggregator, Encoder, Task
    from histobench.evaluate.options import EvalOptions
    from histobench.reporting import Reporter

INPUT_KINDS = frozenset({"features", "tiles", "encoder"})


@dataclass
class ProtocolInputs:
    """Everything a protocol may use. ``features``, ``slides`` and ``encoder`` are set when it asked for them.

    ``extract(module, slides, tag)`` encodes tiles with the core's extraction stage (cached, keyed by the
    module's weights) and returns ``slide_id -> [N, D]``; a protocol that fine-tunes the encoder uses it to
    re-extract a fold's test slides. ``artifacts`` is a folder for files the protocol wants logged (e.g. a
    fold's fine-tuned weights); ``metrics`` collects extra scalars it wants logged on the parent run.
    """

    task: "Task"
    manifest: "pd.DataFrame"
    splits: "Splits"
    aggregator: "Aggregator"
    eval: "EvalOptions"
    reporter: "Reporter"
    features: "Mapping[str, np.ndarray] | None" = None
    slides: list | None = None  # [SlideTiles]
    encoder: Any = None  # nn.Module
    encoder_component: "Encoder | None" = None
    extract: "Callable[[Any, list, str], Mapping[str, np.ndarray]] | None" = None
    device: str | None = None
    artifacts: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    progress: Callable[..., None] | None = None


class FrozenMIL(Protocol):
    """Frozen features, one aggregator trained per fold on the train + val patients, metrics on the test patients."""

    name = "frozen-mil"
    inputs = frozenset({"features"})

    class Options(StrictOptions):
        pass

    def evaluate(self, inputs: ProtocolInputs):
        from histobench.evaluate.protocol import evaluate_features

        task = inputs.task
        return evaluate_features(task_kind=task.task_kind, classes=list(task.classes), manifest=inputs.manifest,
                                 features=inputs.features, splits=inputs.splits, aggregator=inputs.aggregator,
                                 opts=inputs.eval, metrics=list(task.metrics) or None, progress=inputs.progress)
