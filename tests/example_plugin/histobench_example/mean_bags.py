"""``frozen-mean``: an example evaluation protocol that evaluates slide-mean features instead of whole bags.

It shows what a protocol receives (``ProtocolInputs``: the task, the manifest, the core's folds, the
aggregator and the evaluation policy, plus the cached features it asked for) and that it reuses the core's
evaluation loop, so its folds and metrics are the same as every other protocol's.
"""

from pydantic import Field

from histobench.components import Protocol, StrictOptions


class FrozenMeanBags(Protocol):
    """Frozen features averaged per slide (a one-tile bag), then the task's aggregator over the core's folds."""

    name = "frozen-mean"
    inputs = frozenset({"features"})

    class Options(StrictOptions):
        standardise: bool = Field(False, description="Standardise each slide mean over the cohort first.")

    def evaluate(self, inputs):
        import numpy as np

        from histobench.evaluate.protocol import evaluate_features

        means = {sid: np.asarray(bag, dtype=np.float32).mean(axis=0, keepdims=True)
                 for sid, bag in ((s, inputs.features[s]) for s in inputs.manifest["slide_id"] if s in inputs.features)}
        if self.options.standardise and means:
            stack = np.concatenate(list(means.values()))
            mu, sd = stack.mean(0), stack.std(0) + 1e-6
            means = {k: (v - mu) / sd for k, v in means.items()}
        inputs.metrics["protocol/slides_averaged"] = float(len(means))
        task = inputs.task
        return evaluate_features(task_kind=task.task_kind, classes=list(task.classes), manifest=inputs.manifest,
                                 features=means, splits=inputs.splits, aggregator=inputs.aggregator, opts=inputs.eval,
                                 metrics=list(task.metrics) or None, progress=inputs.progress)
