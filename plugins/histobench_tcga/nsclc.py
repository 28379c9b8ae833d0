"""TCGA-NSCLC: lung adenocarcinoma (LUAD) vs lung squamous cell carcinoma (LUSC) subtyping.

Labels ship with the plugin: ``data/hipt_tcga_lung.csv`` (958 diagnostic slides of 862 patients, from
mahmoodlab/HIPT, Apache-2.0 with Commons Clause), so a user points the task at a folder of downloaded
slides and nothing else. Patient = the first 12 characters of the TCGA barcode.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from pydantic import Field

from histobench.components import Task
from histobench.errors import HistobenchError


class TCGANSCLC(Task):
    """TCGA-NSCLC subtyping: LUAD vs LUSC, patient-level stratified 10-fold."""

    name = "tcga-nsclc"
    aliases = ("nsclc",)
    task_kind = "subtyping"
    classes = ("LUAD", "LUSC")
    metrics = ("macro_auc", "balanced_accuracy", "weighted_f1")
    primary_metric = "macro_auc"
    default_aggregator = "abmil"
    license = "TCGA data: NIH GDC open access; label table: mahmoodlab/HIPT (Apache-2.0 with Commons Clause)"

    class Options(Task.Options):
        demo_patients: int = Field(24, ge=4, description="Patients in the synthetic --demo cohort.")
        demo_slide_px: int = Field(2048, ge=512, description="Level-0 side of each synthetic demo slide (at 0.25 µm/px).")

    presets = {"demo": {"mpp": 1.0, "tile_size": 64, "folds": 4, "min_tissue": 0.5}}

    def labels(self):
        import pandas as pd

        table = pd.read_csv(files("histobench_tcga").joinpath("data/hipt_tcga_lung.csv"))
        table["slide_id"] = table["slide_id"].str.replace(r"\.svs$", "", regex=True)
        return table.rename(columns={"oncotree_code": "label"})[["slide_id", "case_id", "label"]]

    def cohort(self, data_root: Path):
        table = self.labels()
        found = {p.name.split(".svs")[0]: p for p in Path(data_root).rglob("*.svs")}
        table["path"] = table["slide_id"].map(lambda s: str(found[s]) if s in found else None)
        present = table.dropna(subset=["path"]).reset_index(drop=True)
        if present.empty:
            raise HistobenchError(
                f"no TCGA-NSCLC slide (<slide_id>.svs from the GDC) found under {data_root}; "
                f"{len(table)} are listed in the task's label table"
            )
        return present[["slide_id", "case_id", "path", "label"]]

    def demo_cohort(self, out_dir: Path, seed: int = 0):
        from histobench.slides.synthetic import make_demo_cohort

        side = self.options.demo_slide_px
        df = make_demo_cohort(out_dir, classes=list(self.classes), n_patients=self.options.demo_patients,
                              seed=seed, size=(side, side), mpp=0.25)
        df = df.copy()
        df["path"] = [str(p if Path(p).is_absolute() else Path(out_dir) / p) for p in df["path"]]
        return df
