"""Segmentation cases from a manifest: an image NIfTI, its mask NIfTI, a patient and a split.

A manifest is a CSV with the columns ``image``, ``mask``, ``patient_id`` and ``split`` (``train``,
``val`` or ``test``); paths are relative to the manifest's folder (or absolute) and must lie
inside the allowed roots (``imaging.paths.confine``). Each row is checked on its own, and a row
that cannot be used becomes a :class:`imaging.problems.Problem` naming the file, never an
exception for the whole site:

- both files exist and nibabel reads them (``missing``, ``unreadable``); a header declaring
  more than :data:`MAX_VOLUME_BYTES` is refused before anything is decoded (``too-large``);
- image and mask have the same 3D shape and the same affine (to 1e-3 mm), and the image's values
  are finite (``bad-values``);
- every mask value is one of the declared class indices (``label``; 0 is background).

The image is clipped to its 0.5-99.5 percentiles (of nonzero voxels; MedSAM's MR protocol) and
scaled to [0, 1]. The mask keeps its class indices; :func:`foreground` merges the declared
foreground classes into one (medfed's box-prompted path segments one structure per box: for
MSD hippocampus, anterior + posterior = "hippocampus").

Slices are taken along :data:`SLICE_AXIS` (the volume's first array axis, the sagittal plane of
the MSD hippocampus crops: about 35 slices of 50 x 35 voxels, 20-25 of them with foreground).
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from core.errors import MedfedError
from imaging.paths import OutsideRootError, confine
from imaging.problems import ManifestError, Problem

logger = logging.getLogger(__name__)

COLUMNS = ("image", "mask", "patient_id", "split")
SPLITS = ("train", "val", "test")
SLICE_AXIS = 0
AFFINE_TOLERANCE_MM = 1e-3
CLIP_PERCENTILES = (0.5, 99.5)
MAX_VOLUME_BYTES = 256 * 2**20
"""Largest volume a header may declare, as float32 (a 512^3 CT is 512 MiB: crop it first)."""


@dataclass(frozen=True)
class SegmentationRow:
    """One manifest row: paths as written, the patient and the split; ``line`` in the file."""

    line: int
    image: str
    mask: str
    patient_id: str
    split: str


@dataclass(frozen=True)
class SegmentationCase:
    """One checked case.

    Attributes:
        patient_id: the manifest's patient id.
        split: ``train``, ``val`` or ``test``.
        image: ``(X, Y, Z)`` float32 in [0, 1] (percentile-clipped).
        mask: ``(X, Y, Z)`` uint8 class indices.
        affine: ``(4, 4)`` voxel -> world millimetres (the image's).
    """

    patient_id: str
    split: str
    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray


class RowError(MedfedError, ValueError):
    """A row that cannot be used; ``kind`` is one of ``imaging.problems.KINDS``."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


def read_segmentation_manifest(path: Path) -> list[SegmentationRow]:
    """The rows of a segmentation manifest (CSV with :data:`COLUMNS`).

    Raises:
        ManifestError: the file is missing, or lacks a column.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}; a "
                                f"segmentation manifest has {', '.join(COLUMNS)}")
        return [SegmentationRow(line=i, image=row["image"].strip(), mask=row["mask"].strip(),
                                patient_id=row["patient_id"].strip(),
                                split=row["split"].strip().lower())
                for i, row in enumerate(reader, start=2)]


def _read(written: str, base: Path, roots: tuple[Path, ...]) -> nib.Nifti1Image:
    try:
        path = confine(written, base, roots)
    except OutsideRootError as err:
        raise RowError("outside", f"{written}: {err}") from err
    if not path.is_file():
        raise RowError("missing", f"{written}: no such file")
    try:
        image = nib.load(path)  # the header only: nothing is decoded yet
    except Exception as err:  # nibabel raises many types for a bad file
        raise RowError("unreadable", f"{written}: not a readable NIfTI file ({err})") from err
    if len(image.shape) != 3:
        raise RowError("unsupported", f"{written}: shape {image.shape} is not a 3D volume")
    # A hostile header declares any size: bound it before anything is allocated or inflated
    # (nibabel then reads exactly the declared bytes, so a gzip bomb stops there too).
    declared = math.prod(int(n) for n in image.shape) * 4  # decoded as float32
    if declared > MAX_VOLUME_BYTES:
        raise RowError("too-large", f"{written}: its header declares {image.shape} voxels "
                       f"({declared / 2**20:,.0f} MiB as float32), above "
                       f"{MAX_VOLUME_BYTES / 2**20:,.0f} MiB: nothing was decoded; export a "
                       "cropped volume")
    try:
        image.get_fdata(dtype=np.float32)  # decode now: a truncated file fails here
    except Exception as err:  # nibabel raises many types for a bad file
        raise RowError("unreadable", f"{written}: not a readable NIfTI file ({err})") from err
    return image


def normalise_intensity(volume: np.ndarray) -> np.ndarray:
    """``(X, Y, Z)`` values -> float32 in [0, 1]: clipped to the 0.5-99.5 percentiles of the
    nonzero voxels (all voxels if none is nonzero), then min-max scaled."""
    values = volume[volume != 0] if np.any(volume != 0) else volume.ravel()
    low, high = np.percentile(values, CLIP_PERCENTILES)
    clipped = np.clip(volume, low, high)
    return ((clipped - low) / max(float(high - low), 1e-8)).astype(np.float32)


def load_case(row: SegmentationRow, base: Path, roots: tuple[Path, ...],
              classes: tuple[int, ...]) -> SegmentationCase:
    """Read and check one row (see the module's docstring).

    Args:
        row: the manifest row.
        base: the manifest's folder (relative paths start there).
        roots: allowed folders, resolved.
        classes: declared mask values, background (0) included.

    Raises:
        RowError: the row cannot be used; its message names the file and says why.
    """
    if row.split not in SPLITS:
        raise RowError("row", f"{row.image}: split '{row.split}' is not one of {SPLITS}")
    image, mask = _read(row.image, base, roots), _read(row.mask, base, roots)
    if image.shape != mask.shape:
        raise RowError("bad-values", f"{row.mask}: shape {mask.shape} differs from its image "
                       f"{row.image} {image.shape}")
    if not np.allclose(image.affine, mask.affine, atol=AFFINE_TOLERANCE_MM):
        raise RowError("bad-values", f"{row.mask}: its affine (voxel -> mm) differs from its "
                       f"image's ({row.image}): not the same grid")
    voxels = image.get_fdata(dtype=np.float32)
    if not np.isfinite(voxels).all():
        raise RowError("bad-values", f"{row.image}: holds NaN or infinite values")
    labels = np.asarray(mask.dataobj)
    values = np.unique(labels)
    if (extra := sorted(set(values.tolist()) - set(classes))):
        shown = ", ".join(f"{float(v):g}" for v in extra)  # 7, not 7.0 from a float mask
        raise RowError("label", f"{row.mask}: mask values {shown} are not among the declared "
                       f"classes {list(classes)}")
    return SegmentationCase(patient_id=row.patient_id, split=row.split,
                            image=normalise_intensity(voxels), mask=labels.astype(np.uint8),
                            affine=np.asarray(image.affine))


def load_cases(manifest: Path, classes: tuple[int, ...],
               roots: tuple[Path, ...] | None = None,
               ) -> tuple[list[SegmentationCase], list[Problem]]:
    """Every usable case of a manifest, and a problem for each row that is not.

    ``roots`` default: the manifest's own folder.
    """
    manifest = Path(manifest).resolve()
    base = manifest.parent
    allowed = tuple(Path(r).resolve() for r in roots) if roots else (base,)
    cases: list[SegmentationCase] = []
    problems: list[Problem] = []
    for row in read_segmentation_manifest(manifest):
        try:
            cases.append(load_case(row, base, allowed, classes))
        except RowError as err:
            problems.append(Problem(row=row.line, path=row.image, kind=err.kind,
                                    reason=str(err)))
    for problem in problems:
        logger.warning("segmentation manifest %s: %s", manifest.name, problem)
    return cases, problems


def foreground(mask: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """Boolean mask of the voxels whose class is one of ``classes`` (merged foreground)."""
    return np.isin(mask, classes)


def foreground_slices(mask: np.ndarray, axis: int = SLICE_AXIS) -> np.ndarray:
    """Indices along ``axis`` of the slices holding any foreground (``mask > 0``)."""
    other = tuple(a for a in range(mask.ndim) if a != axis)
    return np.flatnonzero((mask > 0).any(axis=other))
