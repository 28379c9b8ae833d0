"""Built-in tasks on public cohorts: TCGA subtyping (NSCLC, BRCA, RCC), TCGA survival, PANDA grading."""

from histobench import hookimpl
from histobench_tcga.nsclc import TCGANSCLC
from histobench_tcga.panda import PANDA
from histobench_tcga.subtyping import TCGABRCA, TCGARCC
from histobench_tcga.survival import SURVIVAL_TASKS


@hookimpl
def register_tasks(register):
    for task in (TCGANSCLC, TCGABRCA, TCGARCC, *SURVIVAL_TASKS, PANDA):
        register(task)
