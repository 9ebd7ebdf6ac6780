"""Train/validation split per patient: one patient's images never sit on both sides."""

from __future__ import annotations

import numpy as np


def assign_splits(patients: list[str], given: list[str], val_fraction: float,
                  seed: int) -> tuple[list[str], list[str]]:
    """The split of each image, decided per patient.

    Args:
        patients: patient id of each image.
        given: the manifest's split of each image (``train``, ``val`` or ``""``).
        val_fraction: share of the patients without a given split that go to validation; at
            least one patient when there are two or more and no patient has a given ``val``.
        seed: seeds which patients go to validation.

    Returns:
        the split of each image, and the patients the manifest put on both sides (all their
        images go to training).
    """
    sides: dict[str, set[str]] = {}
    for patient, split in zip(patients, given, strict=True):
        sides.setdefault(patient, set())
        if split:
            sides[patient].add(split)
    conflicted = sorted(p for p, s in sides.items() if len(s) > 1)
    decided = {p: ("train" if len(s) > 1 else next(iter(s))) for p, s in sides.items() if s}
    open_patients = sorted(p for p, s in sides.items() if not s)
    n_val = int(round(val_fraction * len(open_patients)))
    if (n_val == 0 and val_fraction > 0 and len(open_patients) >= 2
            and "val" not in decided.values()):
        n_val = 1
    order = np.random.default_rng(seed).permutation(len(open_patients))
    val = {open_patients[i] for i in order[:n_val]}
    decided |= {p: ("val" if p in val else "train") for p in open_patients}
    return [decided[p] for p in patients], conflicted
