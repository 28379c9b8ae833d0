"""The pipeline of ``histobench run`` and its single-stage commands, by role.

* :mod:`~histobench.pipeline.spec`: what a run is made of (:class:`RunSpec`) and its resolved components
  (:func:`resolve`, which checks every declared input can be produced before any work);
* :mod:`~histobench.pipeline.stages`: the stages (cohort, folds, tiles, masks, pretraining, extraction, protocol);
* :mod:`~histobench.pipeline.regions`: the region path of hierarchical (``grid``) encoders;
* :mod:`~histobench.pipeline.record`: provenance and the evaluation record in MLflow;
* :mod:`~histobench.pipeline.runner`: ``run``, all of it as one MLflow parent run.
"""

from histobench.pipeline.record import log_evaluation, provenance
from histobench.pipeline.regions import grid_dataset, patch_grids, region_cohort, region_features
from histobench.pipeline.runner import RunResult, run
from histobench.pipeline.spec import DEFAULT_PROTOCOL, NO_PRETEXT, Components, RunSpec, digest, resolve
from histobench.pipeline.stages import (CohortInputs, cohort_inputs, encode_cohort, evaluate_stage, extract_stage,
                                        load_cohort, make_splits, pretrain_cohort, pretrain_inputs, pretrain_stage,
                                        segment_stage, tile_cohort, tile_slides)

__all__ = [
    "DEFAULT_PROTOCOL", "NO_PRETEXT", "CohortInputs", "Components", "RunResult", "RunSpec", "cohort_inputs", "digest",
    "encode_cohort", "evaluate_stage", "extract_stage", "grid_dataset", "load_cohort", "log_evaluation",
    "make_splits", "patch_grids", "pretrain_cohort", "pretrain_inputs", "pretrain_stage", "provenance",
    "region_cohort", "region_features", "resolve", "run", "segment_stage", "tile_cohort", "tile_slides",
]
