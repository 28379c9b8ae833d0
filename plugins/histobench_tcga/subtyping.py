"""TCGA-BRCA (IDC vs ILC) and TCGA-RCC (KIRC / KIRP / KICH) subtyping, labelled per patient from TCGA-CDR."""

from __future__ import annotations

from histobench_tcga.base import DEMO_PRESET, SUBTYPING_METRICS, TCGATask, cdr_labels


class TCGABRCA(TCGATask):
    """TCGA-BRCA subtyping: invasive ductal (IDC) vs invasive lobular (ILC) carcinoma, patient-level 10-fold.

    Labels: TCGA-CDR ``histological_type`` per patient ("Infiltrating Ductal Carcinoma" -> IDC, "Infiltrating
    Lobular Carcinoma" -> ILC; mixed, mucinous, metaplastic and other types are left out: 784 IDC and 203 ILC
    patients). Every diagnostic (DX) slide of a labelled patient under the data root is used.
    """

    name = "tcga-brca"
    aliases = ("brca",)
    task_kind = "subtyping"
    classes = ("IDC", "ILC")
    metrics = SUBTYPING_METRICS
    primary_metric = "macro_auc"
    HISTOLOGY = {"Infiltrating Ductal Carcinoma": "IDC", "Infiltrating Lobular Carcinoma": "ILC"}

    def labels(self):
        return cdr_labels(("BRCA",), self.HISTOLOGY, column="histological_type")


class TCGARCC(TCGATask):
    """TCGA-RCC subtyping: clear cell (KIRC), papillary (KIRP) and chromophobe (KICH) renal cell carcinoma.

    Labels: the patient's TCGA project (TCGA-CDR ``type``: 537 KIRC, 291 KIRP, 113 KICH patients). Every
    diagnostic (DX) slide of a labelled patient under the data root is used; patient-level stratified 10-fold.
    """

    name = "tcga-rcc"
    aliases = ("rcc",)
    task_kind = "subtyping"
    classes = ("KIRC", "KIRP", "KICH")
    metrics = SUBTYPING_METRICS
    primary_metric = "macro_auc"
    presets = {"demo": {**DEMO_PRESET, "demo_slide_px": 1536}}

    def labels(self):
        return cdr_labels(("KIRC", "KIRP", "KICH"))
