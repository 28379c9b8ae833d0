"""An example histobench plugin: a max-pooling aggregator, a ``frozen-mean`` protocol, a ``feature-norms`` analysis and
a ``hello`` command."""

from histobench import hookimpl
from histobench_example.feature_norms import FeatureNorms
from histobench_example.maxpool import MaxPool
from histobench_example.mean_bags import FrozenMeanBags


@hookimpl
def register_aggregators(register):
    register(MaxPool)


@hookimpl
def register_protocols(register):
    register(FrozenMeanBags)


@hookimpl
def register_analyses(register):
    register(FeatureNorms)


@hookimpl
def register_commands(app):
    @app.command("example-hello")
    def hello() -> None:
        """Say which plugin is speaking."""
        print("hello from histobench-example")
