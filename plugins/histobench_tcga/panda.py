"""PANDA: prostate biopsy ISUP grade group (0-5) from the Prostate cANcer graDe Assessment challenge."""

from __future__ import annotations

from pathlib import Path

from histobench.errors import HistobenchError
from histobench_tcga.base import SlideTask


class PANDA(SlideTask):
    """PANDA grading: ISUP grade group 0-5 of prostate biopsies, stratified 5-fold; primary metric QWK.

    Data root: the challenge folder, with ``train.csv`` and ``train_images/<image_id>.tiff``. Labels, checks
    and drops (bad grades, a Gleason score contradicting the ISUP grade) come from ``histobench cohort
    import-panda``. PANDA has no patient ids: each biopsy is its own case (as in the challenge's splits).
    The PANDA TIFFs carry their pixel size in the TIFF resolution tags; pass ``--mpp`` where they do not.
    """

    name = "panda"
    task_kind = "grading"
    classes = ("0", "1", "2", "3", "4", "5")
    metrics = ("qwk", "balanced_accuracy", "macro_auc")
    primary_metric = "qwk"
    default_aggregator = "abmil"
    license = "PANDA challenge data: CC BY-SA-NC 4.0 (Radboud and Karolinska)"
    slide_glob = ("*.tiff",)
    presets = {"demo": {"mpp": 1.0, "tile_size": 64, "folds": 4, "min_tissue": 0.5, "demo_patients": 30,
                        "demo_slide_px": 1536}}

    class Options(SlideTask.Options):
        folds: int = 5

    def labels(self):  # pragma: no cover - needs the challenge data
        raise HistobenchError("panda's labels come from the data root's train.csv (see cohort())")

    def known_slide_ids(self):
        return None

    def cohort(self, data_root: Path):
        from histobench.cohorts.importers import import_panda

        root = Path(data_root)
        csv = root / "train.csv"
        if not csv.exists():
            raise HistobenchError(f"PANDA data root {root} has no train.csv (expected train.csv and train_images/)")
        images = root / "train_images"
        manifest, report = import_panda(csv, slides=images if images.is_dir() else root)
        if manifest.empty:
            raise HistobenchError(f"no PANDA slide found: {report.summary()}")
        return manifest
