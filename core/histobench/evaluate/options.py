"""The one training policy for slide-level heads: the same for every method, so results are comparable."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from histobench.components import StrictOptions


class EvalOptions(StrictOptions):
    """How every aggregator is trained and evaluated (``-o eval.<field>=value``).

    AdamW with a cosine learning-rate decay from ``lr`` to zero over all steps, no warm-up. AdamW's weight
    decay is decoupled: each step shrinks the weights by ``lr * weight_decay``, so its useful values are
    about a hundred times those of Adam's coupled L2 (the 1e-5 of CLAM/HIPT); the default 1e-2 is PyTorch's
    AdamW default. Biases are not decayed. For the ``mean-linear`` head this decay is the L2 penalty of the
    logistic regression. There is no early stopping: every fold trains for ``epochs`` on its train and val
    patients together, so no method can tune on held-out data. Survival heads use the discrete-time NLL
    (no class weighting) over ``survival_bins`` intervals; the protocol's second survival model is a ridge
    Cox PH (``cox_alpha``) on mean-pooled features. With ``seeds > 1`` every fold is trained once per seed
    (seed ``seed + 1000 * s + k`` for fold ``k``, repeat ``s``); a fold's value is the mean over its seeds, and
    the mean ± sd and t-interval are over folds.

    Before any fold is trained, every test fold must hold at least ``min_test_per_class`` patients of each
    class of the cohort (for survival: patients with an event). When the task's fold count is too large for
    the cohort, ``small_folds`` says what happens: ``fewer`` uses the largest fold count that meets the
    threshold (fewest 2; a warning line names the new split and its hash, which the run logs), ``refuse``
    stops with a one-line error.
    """

    epochs: int = Field(20, ge=1, description="Passes over the training bags per fold.")
    lr: float = Field(2e-4, gt=0, description="Peak AdamW learning rate (cosine decay to 0, no warm-up).")
    weight_decay: float = Field(
        1e-2, ge=0, description="AdamW decoupled weight decay on weight matrices (not biases); the L2 of linear heads."
    )
    batch_size: int = Field(16, ge=1, description="Bags per optimizer step (padded and masked to the longest bag).")
    max_tiles: int = Field(
        512, ge=1, description="Tiles randomly sampled per bag per training step; evaluation always uses all tiles."
    )
    class_weighting: Literal["balanced", "none"] = Field(
        "balanced", description="'balanced': cross-entropy weights n / (C * n_c) from the training labels."
    )
    seed: int = Field(0, description="Seed of initialisation, batching, tile sampling and dropout (fold k uses seed + k).")
    seeds: int = Field(1, ge=1, description="Training repeats per fold with different seeds (a fold's value is their mean).")
    survival_bins: int = Field(4, ge=2, description="Discrete-time survival intervals, cut at quantiles of uncensored training times.")
    cox_alpha: float = Field(1.0, ge=0, description="Ridge penalty of the Cox PH model on standardised mean-pooled features.")
    bootstrap: int = Field(1000, ge=0, description="Patient-level bootstrap replicates for the pooled 95% CIs (0: none).")
    min_test_per_class: int = Field(
        2, ge=0, description="Fewest test patients of each class (survival: with an event) every test fold must hold (0: no check)."
    )
    small_folds: Literal["fewer", "refuse"] = Field(
        "fewer", description="When test folds are too small: 'fewer' folds (announced, logged with the split hash) or 'refuse'."
    )
    device: str = Field("auto", description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
