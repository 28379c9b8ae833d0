"""Class-balanced replication of patients for HLSS pretraining (opt-in; it reads diagnoses).

HiDisc (Jiang et al., CVPR 2023, arXiv:2303.01605) and HLSS (Watawana et al., MICCAI 2024, arXiv:2403.14616)
train with ``balance_study_per_class``: the patient list is replicated per diagnosis class up to the size of the
largest class, and an "epoch" is a pass over that longer list (spec ``/work/shared/methods/hlss.md`` §2.1, P9,
P15). It uses labels, so histobench leaves it off unless the user names a labels file
(``-o pretext.balance_labels=CSV``, e.g. the task's manifest); the option is part of the run's recorded options.

Replication [ours where the spec is silent]: class ``c`` with ``n_c`` patients, largest class ``n_max``: every
patient ``n_max // n_c`` times, plus ``n_max % n_c`` more drawn without replacement (seeded), so every class
holds exactly ``n_max`` entries. A patient's class is the most frequent label over its rows in the file (ties:
the first in sorted order). Replicas of one patient may share a batch; SupCon then treats them as different
instances (negatives), as the authors' code does.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from histobench.components import CohortMeta
from histobench.errors import HistobenchError


def patient_classes(path: str | Path, cohort: CohortMeta) -> list[str]:
    """The class of every patient of ``cohort`` (patient-index order) from a CSV with a ``label`` column and a
    ``case_id`` (patient) or ``slide_id`` column. A cohort patient the file does not label is an error."""
    import pandas as pd

    path = Path(path).expanduser()
    if not path.is_file():
        raise HistobenchError(f"pretext.balance_labels: {path} does not exist")
    try:
        table = pd.read_csv(path, dtype=str)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's file problem
        raise HistobenchError(f"pretext.balance_labels: {path} is not a readable CSV ({type(e).__name__})") from None
    if "label" not in table.columns or not {"case_id", "slide_id"} & set(table.columns):
        raise HistobenchError(f"pretext.balance_labels: {path} needs a 'label' column and a 'case_id' or 'slide_id' "
                              f"column (it has {', '.join(map(str, table.columns))})")
    table = table.dropna(subset=["label"])
    votes: dict[str, Counter] = {}
    if "case_id" in table.columns:
        for case, label in zip(table["case_id"], table["label"]):
            votes.setdefault(str(case), Counter())[str(label)] += 1
    else:
        patient_of = dict(zip(cohort.slide_ids, cohort.patient_ids))
        for sid, label in zip(table["slide_id"], table["label"]):
            if str(sid) in patient_of:
                votes.setdefault(patient_of[str(sid)], Counter())[str(label)] += 1
    out = []
    for patient in dict.fromkeys(cohort.patient_ids):  # patient-index order (first appearance)
        counts = votes.get(patient)
        if not counts:
            raise HistobenchError(f"pretext.balance_labels: patient {patient!r} has no label in {path}")
        top = max(counts.values())
        out.append(sorted(k for k, v in counts.items() if v == top)[0])
    return out


def replicate_by_class(patients: np.ndarray, classes: list[str], seed: int) -> np.ndarray:
    """``patients`` (patient indices) replicated so that every class appears as often as the largest one."""
    rng = np.random.default_rng([int(seed), 104729])
    of_class: dict[str, list[int]] = {}
    for p in patients:
        of_class.setdefault(classes[int(p)], []).append(int(p))
    n_max = max((len(v) for v in of_class.values()), default=0)
    out: list[int] = []
    for c in sorted(of_class):
        own = np.array(of_class[c], dtype=np.int64)
        whole, rest = divmod(n_max, len(own))
        out += np.tile(own, whole).tolist() + np.sort(rng.choice(own, rest, replace=False)).tolist()
    return np.array(out, dtype=np.int64)


def balance_sampler(sampler, classes: list[str], seed: int):
    """Make a :class:`~histobench.pretrain.samplers.PatientSampler` draw its epochs from the balanced patient list
    (its ``patients`` and ``steps_per_epoch`` change; everything else stays the core's). Returns the sampler,
    with ``class_counts`` (class -> patients before replication)."""
    sampler.class_counts = dict(sorted(Counter(classes[int(p)] for p in sampler.patients).items()))
    sampler.patients = replicate_by_class(sampler.patients, classes, seed)
    sampler.steps_per_epoch = len(sampler.patients) // sampler.batch_size
    return sampler
