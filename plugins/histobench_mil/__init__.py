"""histobench-mil: multiple-instance-learning slide heads (gated-attention ABMIL and a mean-pooling linear probe)."""

from histobench import hookimpl
from histobench_mil.abmil import ABMIL
from histobench_mil.mean_linear import MeanLinear


@hookimpl
def register_aggregators(register):
    register(ABMIL)
    register(MeanLinear)
