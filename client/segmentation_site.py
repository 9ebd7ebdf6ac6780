"""A hospital's segmentation data as a round sees it: slices of its cases, embedded once.

The hospital's ``manifest`` (node config; ``hospital.toml`` ``manifest``) is a segmentation
manifest (``imaging.segmentation``: image NIfTI, mask NIfTI, patient id, split) when the run's
backbone is a segmentation backbone. Its ``classes`` (``hospital.toml``) name its mask values in
order (value 0 first, the background); the study names the background and one structure, and
every mask value whose name is the structure's, or starts with it and a dash
(``hippocampus-anterior`` for ``hippocampus``), is that structure's foreground
(:func:`mask_classes`). Rows that cannot be used are row problems (logged), never a failure of
the whole site.

Slices are taken at the hospital (``imaging.segmentation.SLICE_AXIS``); only slices holding
foreground are used (a tight box needs a structure). Their image embeddings are computed once
and kept on disk in the site folder (node config ``embedding-cache``; default
``.medfed-embeddings`` beside the manifest): they are derived from patients' images and never
leave the hospital.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from flwr.app import Context
from peft import PeftModel

from client.classes import ClassMismatch
from client.data.config import from_node_config as site_data_from_node_config
from client.site_folder import EMBEDDING_CACHE_KEY
from imaging.segmentation import SegmentationCase, foreground, foreground_slices, load_cases
from models.config import SegmentationConfig
from models.segmentation import SliceSet, embedding_cache, make_slice_set, spread

logger = logging.getLogger(__name__)

CACHE_KEY = EMBEDDING_CACHE_KEY
"""Node-config key: the folder of this hospital's cached image embeddings."""
DEFAULT_CACHE = ".medfed-embeddings"


@dataclass
class SegmentationSite:
    """One hospital's slices for a round; never leaves the hospital.

    Attributes:
        train: training slices (``len``: the slice count, the averaging weight).
        val: validation slices, ``val.cases`` indexing :attr:`val_spacing`.
        train_patients: distinct patients in ``train`` (the privacy unit).
        val_spacing: per validation case, millimetres between its stacked slices and along
            each slice's two axes (for HD95).
        info: what the coordinator may learn: a fingerprint of the training slices and counts.
    """

    train: SliceSet
    val: SliceSet
    train_patients: int
    val_spacing: list[tuple[float, float, float]]
    info: dict[str, int | str] = field(default_factory=dict)


def mask_classes(site_classes: Sequence[str], study_classes: Sequence[str]
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The mask values this hospital declares and those that are the study's structure.

    Raises:
        ClassMismatch: the study does not name a background and one structure, or a named
            mask value is neither the background nor part of the structure.
    """
    if study_classes and len(study_classes) != 2:
        raise ClassMismatch(f"a segmentation study names the background and one structure, "
                            f"not {list(study_classes)} (per-structure prompts are not built)")
    if not site_classes:
        return (0, 1), (1,)
    structure = study_classes[1].casefold() if study_classes else ""
    values = []
    for value, name in enumerate(site_classes[1:], start=1):
        folded = name.casefold()
        if structure and folded != structure and not folded.startswith(structure + "-"):
            raise ClassMismatch(f"this hospital's mask value {value} ('{name}') is not the "
                                f"study's structure '{study_classes[1]}' nor a part of it "
                                f"('{study_classes[1]}-...'): rename it in hospital.toml "
                                "'classes' or leave this study")
        values.append(value)
    return tuple(range(len(site_classes))), tuple(values)


def slices_of(cases: list[SegmentationCase], per_case: int, structure: tuple[int, ...]
            ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int], list[float]]:
    """``(H, W)`` images and merged masks of each case's chosen foreground slices, their case
    index and each case's distance between chosen slices (in slices)."""
    images, masks, index, gaps = [], [], [], []
    for number, case in enumerate(cases):
        merged = foreground(case.mask, structure)
        chosen = spread(foreground_slices(merged).tolist(), per_case)
        gaps.append((chosen[-1] - chosen[0]) / (len(chosen) - 1) if len(chosen) > 1 else 1.0)
        for k in chosen:
            images.append(torch.from_numpy(case.image[k].copy()))
            masks.append(torch.from_numpy(merged[k].copy()))
            index.append(number)
    return images, masks, index, gaps


def _fingerprint(data: SliceSet) -> str:
    """sha256 of the training targets and embeddings as trained on."""
    digest = hashlib.sha256()
    for tensor in (data.targets, data.embeddings):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class SegmentationCounts:
    """A segmentation site as the study check sees it, nothing embedded: its usable training
    patients (the privacy unit) and validation cases."""

    train: tuple[str, ...]
    val: tuple[str, ...]


def usable_cases(context: Context, study_classes: Sequence[str]
                 ) -> tuple[dict[str, list[SegmentationCase]], tuple[int, ...]]:
    """The manifest's usable train and validation cases holding the structure, and the mask
    values that are the structure.

    Raises:
        KeyError: the node config names no ``manifest``.
        ClassMismatch: the classes do not fit (:func:`mask_classes`).
        ValueError: no usable training or validation case with foreground.
    """
    node_config = context.node_config
    if "manifest" not in node_config:
        raise KeyError("this hospital's node config has no 'manifest': set hospital.toml "
                       "'manifest' to its segmentation manifest (image, mask, patient_id, split)")
    manifest = Path(str(node_config["manifest"]))
    reader = site_data_from_node_config(node_config)
    declared, structure = mask_classes(reader.classes, study_classes)
    roots = tuple(Path(r) for r in reader.allowed_roots) or None
    cases, _ = load_cases(manifest, declared, roots)  # problems are logged by load_cases
    by_split = {split: [c for c in cases if c.split == split
                        and foreground(c.mask, structure).any()] for split in ("train", "val")}
    for split, chosen in by_split.items():
        if not chosen:
            raise ValueError(f"{manifest}: no usable {split} case with the structure in its "
                             "mask; see the row problems logged above")
    return by_split, structure


def segmentation_counts(context: Context, study_classes: Sequence[str]) -> SegmentationCounts:
    """:class:`SegmentationCounts` of the hospital's manifest (raises as :func:`usable_cases`)."""
    by_split, _ = usable_cases(context, study_classes)
    return SegmentationCounts(tuple(sorted({c.patient_id for c in by_split["train"]})),
                              tuple(c.patient_id for c in by_split["val"]))


def load_segmentation_site(context: Context, model: PeftModel, settings: SegmentationConfig,
                           study_classes: Sequence[str]) -> SegmentationSite:
    """The hospital's train and validation slices, embedded by ``model``'s frozen encoder.

    Raises:
        KeyError, ClassMismatch, ValueError: as :func:`usable_cases`.
    """
    by_split, structure = usable_cases(context, study_classes)
    node_config = context.node_config
    manifest = Path(str(node_config["manifest"]))
    cache = embedding_cache(Path(str(node_config.get(CACHE_KEY, manifest.parent / DEFAULT_CACHE))))
    base = model.get_base_model()
    images, masks, index, _ = slices_of(by_split["train"], settings.train_slices_per_case,
                                      structure)
    train = make_slice_set(base, images, masks, index, cache)
    images, masks, index, gaps = slices_of(by_split["val"], settings.eval_slices_per_case,
                                         structure)
    val = make_slice_set(base, images, masks, index, cache)
    spacing = []
    for case, gap in zip(by_split["val"], gaps, strict=True):
        sizes = nib.affines.voxel_sizes(case.affine)
        spacing.append((float(sizes[0] * gap), float(sizes[1]), float(sizes[2])))
    patients = len({c.patient_id for c in by_split["train"]})
    info: dict[str, int | str] = {"fingerprint": _fingerprint(train), "train_slices": len(train),
                                  "val_cases": len(by_split["val"])}
    logger.debug("segmentation site: %d training slices of %d patients, %d validation cases",
                len(train), patients, len(by_split["val"]))
    return SegmentationSite(train, val, patients, spacing, info)


def case_count(data: SliceSet) -> int:
    """Distinct cases in ``data``."""
    return int(np.unique(data.cases.numpy()).size)
