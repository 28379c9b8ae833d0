"""TCGA overall-survival tasks (``tcga-<project>-survival``), times and events from TCGA-CDR."""

from __future__ import annotations

from typing import ClassVar

from histobench_tcga.base import DATA, TCGATask, cdr_table

DAYS_PER_MONTH = 30.4375


class TCGASurvival(TCGATask):
    """Base of the TCGA overall-survival tasks: one project, OS from TCGA-CDR, patient-level 5-fold by event."""

    task_kind = "survival"
    classes = ()
    metrics = ("c_index", "c_index_uno")
    primary_metric = "c_index"
    default_aggregator = "abmil"
    license = "TCGA data: NIH GDC open access; survival: TCGA-CDR (Liu et al., Cell 2018)"
    project: ClassVar[str] = ""
    # The survival demo needs more patients than the subtyping one: with ~30, a 4-fold c-index has a CI about
    # 0.4 wide. 80 patients (about 100 slides) recover the planted burden-hazard link (c-index ~0.75).
    presets = {"demo": {"mpp": 1.0, "tile_size": 64, "folds": 4, "min_tissue": 0.5, "demo_patients": 80,
                        "demo_slide_px": 1536}}
    # Longer head training and a stronger Cox ridge for ~60 training patients and 96-d demo features.
    eval_presets = {"demo": {"epochs": 100, "lr": 3e-3, "cox_alpha": 100.0}}

    class Options(TCGATask.Options):
        folds: int = 5

    def labels(self):
        """Per patient: ``case_id, time`` (months, OS.time / 30.4375), ``event`` (OS: 1 death, 0 censored).

        Patients with a missing or non-positive time are kept here; the manifest check reports and drops them.
        """
        cdr = cdr_table()
        cdr = cdr[cdr["type"] == self.project]
        out = cdr.assign(case_id=cdr["bcr_patient_barcode"], time=cdr["OS.time"] / DAYS_PER_MONTH, event=cdr["OS"])
        return out[["case_id", "time", "event"]].drop_duplicates("case_id").reset_index(drop=True)


def _survival_task(project: str, extra_doc: str = "", **attrs) -> type[TCGASurvival]:
    low = project.lower()
    doc = (f"TCGA-{project} overall survival: OS time and event from TCGA-CDR, patient-level 5-fold stratified "
           f"by event.{(' ' + extra_doc) if extra_doc else ''}")
    return type(f"TCGA{project}Survival", (TCGASurvival,),
                {"name": f"tcga-{low}-survival", "aliases": (f"{low}-survival",), "project": project,
                 "__doc__": doc, "__module__": __name__, **attrs})


TCGALUADSurvival = _survival_task(
    "LUAD", "Split preset hipt-5fold: HIPT/MCAT's published 5 folds (case-level, train and held-out sides).",
    split_presets={"hipt-5fold": DATA / "splits" / "hipt-5fold-luad-survival"})
SURVIVAL_TASKS: tuple[type[TCGASurvival], ...] = (TCGALUADSurvival, *(
    _survival_task(p) for p in ("LUSC", "BRCA", "KIRC", "BLCA", "UCEC", "HNSC", "STAD")))
