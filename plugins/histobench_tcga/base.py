"""Shared pieces of the TCGA (and PANDA) task cards: data files, slide lookup, demo cohorts.

A task card subclasses :class:`SlideTask` (or :class:`TCGATask`) and says only what differs: its label table
(per slide or per patient), classes, metrics and split presets. Label tables ship in ``data/`` (see
``data/README.md`` for sources and licenses), so a user only points a task at a folder of slides.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from histobench.components import Task
from histobench.errors import HistobenchError

DATA = Path(__file__).resolve().parent / "data"
DEMO_PRESET = {"mpp": 1.0, "tile_size": 64, "folds": 4, "min_tissue": 0.5}
SUBTYPING_METRICS = ("macro_auc", "balanced_accuracy", "weighted_f1")


def data_file(name: str) -> Path:
    path = DATA / name
    if not path.exists():
        raise HistobenchError(f"the histobench_tcga plugin is missing its data file {name}; reinstall it")
    return path


@lru_cache(maxsize=4)
def _cdr_cached() -> Any:
    import pandas as pd

    return pd.read_csv(data_file("tcga_cdr_os.csv"), dtype={"bcr_patient_barcode": str, "type": str})


def cdr_table():
    """The TCGA-CDR overall-survival table shipped with the plugin (a copy: callers may modify it)."""
    return _cdr_cached().copy()


class SlideTask(Task):
    """Base of tasks whose cohort is a folder of slide files matched against a label table."""

    slide_glob: ClassVar[tuple[str, ...]] = ("*.svs",)
    split_presets: ClassVar[dict[str, Path]] = {}
    demo_patients_default: ClassVar[int] = 24

    class Options(Task.Options):
        split: str = Field("default", description="'default' (histobench's patient-level stratified k-fold) or a "
                                                   "published split preset of the task (see the task's description).")
        demo_patients: int = Field(24, ge=4, description="Patients in the synthetic --demo cohort.")
        demo_slide_px: int = Field(2048, ge=512, description="Level-0 side of each synthetic demo slide (at 0.25 µm/px).")
        demo_signal_fraction: float = Field(
            0.35, gt=0, le=1, description="Share of the tissue of a synthetic subtyping demo slide that shows the "
                                          "class morphology (smaller: a harder demo).")

    presets = {"demo": dict(DEMO_PRESET)}

    # -- labels --------------------------------------------------------------------------------------------
    def labels(self):
        """The label table: ``slide_id`` or only ``case_id`` (then every slide of the patient), and labels."""
        raise NotImplementedError

    def known_slide_ids(self) -> set[str] | None:
        """Slide ids of a per-slide label table (None for per-patient tables: any slide of a known patient)."""
        table = self.labels()
        return set(table["slide_id"].astype(str)) if "slide_id" in table.columns else None

    def slide_case(self, slide_id: str) -> str:
        """The patient of a slide file name (TCGA: the first 12 characters of the barcode)."""
        return slide_id[:12]

    def accept_slide(self, slide_id: str) -> bool:
        """Whether a slide file found under the data root belongs in the cohort (TCGA: diagnostic slides)."""
        return True

    def find_slides(self, data_root: Path) -> dict[str, Path]:
        root = Path(data_root)
        found: dict[str, Path] = {}
        for pattern in self.slide_glob:
            for p in sorted(root.rglob(pattern)):
                found.setdefault(p.stem, p)
        return found

    def cohort(self, data_root: Path):
        import pandas as pd

        table = self.labels()
        found = self.find_slides(data_root)
        if "slide_id" in table.columns:
            table = table.copy()
            table["path"] = table["slide_id"].map(lambda s: str(found[s]) if s in found else None)
            present = table.dropna(subset=["path"])
        else:  # per-patient labels: every accepted slide of a labelled patient
            rows = [{"slide_id": sid, "case_id": self.slide_case(sid), "path": str(p)}
                    for sid, p in found.items() if self.accept_slide(sid)]
            slides = pd.DataFrame(rows, columns=["slide_id", "case_id", "path"])
            present = slides.merge(table, on="case_id", how="inner")
        if present.empty:
            raise HistobenchError(
                f"no slide of task {self.name} ({', '.join(self.slide_glob)} matching its label table of "
                f"{len(table)} rows) found under {data_root}"
            )
        cols = ["slide_id", "case_id", "path"] + self.label_columns()
        return present[cols + [c for c in present.columns if c not in cols]].reset_index(drop=True)

    def label_columns(self) -> list[str]:
        return ["time", "event"] if self.task_kind == "survival" else ["label"]

    # -- demo ----------------------------------------------------------------------------------------------
    def demo_cohort(self, out_dir: Path, seed: int = 0):
        from histobench.slides import synthetic

        side = self.options.demo_slide_px
        kw = dict(n_patients=self.options.demo_patients, seed=seed, size=(side, side), mpp=0.25)
        if self.task_kind == "grading":
            df = synthetic.make_grading_cohort(out_dir, grades=len(self.classes), **kw)
        elif self.task_kind == "survival":
            df = synthetic.make_survival_cohort(out_dir, **kw)
        else:
            df = synthetic.make_demo_cohort(out_dir, classes=list(self.classes),
                                            signal_fraction=self.options.demo_signal_fraction, **kw)
        df = df.copy()
        df["path"] = [str(p if Path(p).is_absolute() else Path(out_dir) / p) for p in df["path"]]
        return df


class TCGATask(SlideTask):
    """Base of TCGA tasks: ``.svs`` diagnostic slides from the GDC, patient = first 12 barcode characters."""

    license = "TCGA data: NIH GDC open access; labels: see the histobench_tcga plugin's data/README.md"

    def accept_slide(self, slide_id: str) -> bool:
        from histobench.cohorts.importers import is_diagnostic

        return is_diagnostic(slide_id)

    def find_slides(self, data_root: Path) -> dict[str, Path]:
        # GDC file names are "<barcode>.<uuid>.svs": the slide id is the name without ".svs".
        return {p.name[: -len(".svs")]: p for p in sorted(Path(data_root).rglob("*.svs"))}


def cdr_labels(projects: tuple[str, ...], mapping: dict[str, str] | None = None, column: str = "type"):
    """Per-patient labels from the shipped TCGA-CDR: patients of ``projects``, ``label`` = ``column``'s value
    mapped through ``mapping`` (values without a mapping are left out)."""
    cdr = cdr_table()
    cdr = cdr[cdr["type"].isin(projects)]
    values = cdr[column].astype(str)
    labels = values.map(mapping) if mapping else values
    out = cdr.assign(case_id=cdr["bcr_patient_barcode"], label=labels).dropna(subset=["label"])
    return out[["case_id", "label"]].drop_duplicates("case_id").reset_index(drop=True)
