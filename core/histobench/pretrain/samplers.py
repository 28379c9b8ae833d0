"""Epoch samplers of the training loop: which dataset items form each step's batch.

A sampler has ``steps_per_epoch`` (global batches in one epoch) and ``batches(epoch, rank, world)``, the index
lists of one epoch for one rank. Both samplers here are seeded by ``(seed, epoch)`` only, so a resumed run
sees the batches of the uninterrupted one, and every rank draws the same global batches and takes its share.

* :class:`TileSampler`: a permutation of all items, cut into batches of ``batch_size`` (the remainder dropped).
* :class:`PatientSampler`: HiDisc's patient-level sampling (Jiang et al., CVPR 2023; kept by HLSS, Watawana
  et al., MICCAI 2024): an epoch is a permutation of the patients; each patient contributes ``S`` of its
  slides (shuffled; cycled when it has fewer) and ``P`` tiles of each (a fresh permutation per slide; wrapped
  around when the slide has fewer), so a batch of ``B`` patients lists ``B * S * P`` items in
  ``[patient, slide, tile]`` order.
"""

from __future__ import annotations

import numpy as np

from histobench.components import CohortMeta
from histobench.errors import HistobenchError


class TileSampler:
    """Seeded permutations of ``n`` items in batches of ``batch_size`` (global, split over ranks)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.steps_per_epoch = self.n // self.batch_size
        self.images_per_batch = self.batch_size
        self.unit = "tiles"

    def batches(self, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n)
        per_rank = self.batch_size // world
        out = []
        for b in range(self.steps_per_epoch):
            chunk = order[b * self.batch_size:(b + 1) * self.batch_size]
            out.append(chunk[rank * per_rank:(rank + 1) * per_rank].tolist())
        return out


class PatientSampler:
    """Batches of ``batch_size`` whole patients, each ``slides`` slides x ``tiles`` tiles.

    Args:
        slide_index: The slide of each dataset item (items of one slide need not be contiguous).
        cohort: Slide ids and patients, in slide-index order.
        batch_size: Patients per step (global, over all ranks).
        slides: ``S``, slides drawn per patient.
        tiles: ``P``, tiles drawn per slide.
        seed: Seed of the epoch permutations.
    """

    def __init__(self, slide_index: np.ndarray, cohort: CohortMeta, batch_size: int, slides: int, tiles: int,
                 seed: int = 0):
        slide_index = np.asarray(slide_index)
        n_slides = len(cohort.slide_ids)
        if len(slide_index) and slide_index.max() >= n_slides:
            raise HistobenchError(f"the dataset has slide index {slide_index.max()} but the cohort names {n_slides} slides")
        self.items_of_slide = [np.flatnonzero(slide_index == s) for s in range(n_slides)]
        patient_of_slide = cohort.patient_index
        n_patients = cohort.n_patients
        # a patient is sampled from its slides that have tiles; one without any cannot be sampled
        self.slides_of_patient = [
            [s for s in np.flatnonzero(patient_of_slide == p) if len(self.items_of_slide[s])] for p in range(n_patients)]
        self.patients = np.array([p for p in range(n_patients) if self.slides_of_patient[p]], dtype=np.int64)
        self.empty_patients = [cohort.patient_ids[int(np.flatnonzero(patient_of_slide == p)[0])]
                               for p in range(n_patients) if not self.slides_of_patient[p]]
        self.batch_size, self.slides, self.tiles, self.seed = int(batch_size), int(slides), int(tiles), int(seed)
        self.steps_per_epoch = len(self.patients) // self.batch_size
        self.images_per_batch = self.batch_size * self.slides * self.tiles
        self.unit = "patients"

    def patient_items(self, patient: int, rng: np.random.Generator) -> list[int]:
        """``S x P`` item indices of one patient, slide-major."""
        own = self.slides_of_patient[patient]
        order = rng.permutation(len(own))
        chosen = [own[order[i % len(own)]] for i in range(self.slides)]
        items: list[int] = []
        for s in chosen:
            pool = self.items_of_slide[s]
            perm = rng.permutation(len(pool))
            items += [int(pool[perm[j % len(pool)]]) for j in range(self.tiles)]
        return items

    def batches(self, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
        if self.batch_size % world:
            raise HistobenchError(f"train.batch_size={self.batch_size} patients is not divisible by the {world} ranks")
        rng = np.random.default_rng([self.seed, epoch])
        order = self.patients[rng.permutation(len(self.patients))]
        per_rank = self.batch_size // world
        out = []
        for b in range(self.steps_per_epoch):
            chunk = order[b * self.batch_size:(b + 1) * self.batch_size]
            # every patient's draw is made on every rank (same generator state), each rank keeps its share
            drawn = [self.patient_items(int(p), rng) for p in chunk]
            mine = drawn[rank * per_rank:(rank + 1) * per_rank]
            out.append([i for items in mine for i in items])
        return out
