"""TCGA-NSCLC: lung adenocarcinoma (LUAD) vs lung squamous cell carcinoma (LUSC) subtyping.

Labels ship with the plugin: ``data/hipt_tcga_lung.csv`` (958 diagnostic slides of 862 patients, from
mahmoodlab/HIPT, Apache-2.0 with Commons Clause), so a user points the task at a folder of downloaded
slides and nothing else. Patient = the first 12 characters of the TCGA barcode.
"""

from __future__ import annotations

from histobench_tcga.base import DATA, SUBTYPING_METRICS, TCGATask, data_file


class TCGANSCLC(TCGATask):
    """TCGA-NSCLC subtyping: LUAD vs LUSC, patient-level stratified 10-fold.

    Split presets (``-o task.split=NAME``): ``default`` (histobench's patient-level stratified folds) and
    ``hipt-10fold``, HIPT's published 10 folds. Known flaw of ``hipt-10fold``: it is slide-level, so 12-19
    patients per fold have slides on two sides (``histobench splits audit --task tcga-nsclc --preset
    hipt-10fold``); evaluating on it needs ``--allow-leaky-splits``.
    """

    name = "tcga-nsclc"
    aliases = ("nsclc",)
    task_kind = "subtyping"
    classes = ("LUAD", "LUSC")
    metrics = SUBTYPING_METRICS
    primary_metric = "macro_auc"
    default_aggregator = "abmil"
    license = "TCGA data: NIH GDC open access; label table and hipt-10fold: mahmoodlab/HIPT (Apache-2.0 with Commons Clause)"
    split_presets = {"hipt-10fold": DATA / "splits" / "hipt-10fold"}

    def labels(self):
        import pandas as pd

        table = pd.read_csv(data_file("hipt_tcga_lung.csv"), dtype={"case_id": str, "slide_id": str})
        table["slide_id"] = table["slide_id"].str.replace(r"\.svs$", "", regex=True)
        return table.rename(columns={"oncotree_code": "label"})[["slide_id", "case_id", "label"]]
