"""Built-in TCGA tasks."""

from histobench import hookimpl
from histobench_tcga.nsclc import TCGANSCLC


@hookimpl
def register_tasks(register):
    register(TCGANSCLC)
