"""A segmentation study read into model slices, with what its outputs need (geometry, headers).

- **NIfTI** (nibabel): the declared shape is bounded (``ReadLimits.max_pixel_bytes`` as float32)
  before any voxel is decompressed, so a gzip bomb cannot inflate past what the header
  declares; slices are taken along :data:`imaging.segmentation.SLICE_AXIS`, as in training.
- **DICOM series** (``imaging.volumes.place_series``: the hospital reader's header guards,
  slices ordered by ``ImagePositionPatient`` along the normal, even gaps): one slice per file,
  ``(rows, columns)`` as a viewer shows it. The mask NIfTI of a series uses
  ``imaging.volumes.read_dicom_series``'s ``(I columns, J rows, K slices)`` grid and RAS affine.

Intensities are scaled as in training (``imaging.segmentation.normalise_intensity`` over the
whole volume). A true mask must have the image's shape and affine; every nonzero value is the
structure (the adapter's one foreground class: MSD's anterior and posterior labels merged, as
training merges them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset

from imaging.guard import DicomReadError, ReadLimits
from imaging.segmentation import AFFINE_TOLERANCE_MM, SLICE_AXIS, normalise_intensity
from imaging.volumes import place_series, series_planes
from inference.seg_studies import SegStudy

NIFTI_AXES = (0, 1, 2)
"""Slices ``(N, H, W)`` -> a NIfTI array: the NIfTI's first axis is the slice axis."""
SERIES_AXES = (2, 1, 0)
"""Slices ``(K, rows, columns)`` -> ``(I columns, J rows, K slices)`` (``read_dicom_series``)."""


@dataclass
class StudyVolume:
    """One study, ready for the model and for its outputs.

    Attributes:
        planes: ``(N, H, W)`` float32 slices in [0, 1] (whole-volume intensity scaling).
        axes: permutation taking ``(N, H, W)`` slices to the NIfTI array of the output.
        affine: ``(4, 4)`` voxel -> RAS millimetres of that NIfTI array.
        header: the input NIfTI's header (its qform/sform codes are kept), or None.
        datasets: a DICOM series' headers in slice order (for the DICOM SEG), or None.
        truth: ``(N, H, W)`` boolean true mask in slice layout, or None.
    """

    planes: np.ndarray
    axes: tuple[int, int, int]
    affine: np.ndarray
    header: nib.Nifti1Header | None = None
    datasets: list[Dataset] | None = None
    truth: np.ndarray | None = None

    def to_nifti_array(self, slices: np.ndarray) -> np.ndarray:
        """``(N, H, W)`` per-slice values -> the output NIfTI's array layout."""
        return np.ascontiguousarray(slices.transpose(self.axes))

    def voxel_mm(self) -> np.ndarray:
        """``(3,)`` voxel size in millimetres along the NIfTI array's axes."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def read_nifti_bounded(path: Path, limits: ReadLimits) -> nib.Nifti1Image:
    """A NIfTI image whose declared 3D size fits ``limits``, its voxels decoded (so that a
    truncated file fails here).

    Raises:
        DicomReadError: unreadable, not 3D, too large, or non-finite values.
    """
    try:
        image = nib.load(path)
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for a bad file
        raise DicomReadError("unreadable", f"{path.name}: not a readable NIfTI file "
                             f"({type(err).__name__}: {err})") from err
    shape = tuple(int(s) for s in image.shape)
    if len(shape) == 4 and shape[-1] == 1:
        image = image.slicer[..., 0]
        shape = shape[:3]
    if len(shape) != 3:
        raise DicomReadError("unsupported", f"{path.name}: shape {shape} is not a 3D volume")
    if int(np.prod(shape, dtype=np.int64)) * 4 > limits.max_pixel_bytes:
        raise DicomReadError("too-large", f"{path.name}: its header declares {shape} voxels, "
                             f"more than max_pixel_bytes ({limits.max_pixel_bytes >> 20} MiB) "
                             "as float32: nothing was decompressed")
    try:
        values = image.get_fdata(dtype=np.float32)
    except Exception as err:  # noqa: BLE001 - truncated or damaged data
        raise DicomReadError("unreadable", f"{path.name}: its voxels cannot be read "
                             f"({type(err).__name__}: {err}); export it again") from err
    if not np.isfinite(values).all():
        raise DicomReadError("bad-values", f"{path.name}: holds NaN or infinite values")
    return nib.Nifti1Image(values, image.affine, header=image.header)


def _truth(mask: Path, volume: StudyVolume, shape: tuple[int, ...],
           limits: ReadLimits) -> np.ndarray:
    """The true mask, checked against the image's grid, in slice layout."""
    image = read_nifti_bounded(mask, limits)
    if image.shape != shape:
        raise DicomReadError("bad-values", f"mask {mask.name}: shape {image.shape} differs "
                             f"from its image's {shape}")
    if not np.allclose(image.affine, volume.affine, atol=AFFINE_TOLERANCE_MM):
        raise DicomReadError("bad-values", f"mask {mask.name}: its affine (voxel -> mm) "
                             "differs from its image's: not the same grid")
    return np.asarray(image.dataobj).transpose(np.argsort(volume.axes)) > 0


def read_study(study: SegStudy, limits: ReadLimits | None = None) -> StudyVolume:
    """Read one study (and its mask, if any) for the model.

    Raises:
        DicomReadError: the image or mask cannot be used; ``kind`` and the message say why.
    """
    limits = limits or ReadLimits()
    if study.image is None:
        kind, _, reason = study.problem.partition(": ")
        raise DicomReadError(kind or "row", reason or "refused")
    if study.image.is_dir():
        placed = place_series(study.image, list(study.files), limits)
        raw = series_planes(placed)
        volume = StudyVolume(normalise_intensity(raw), SERIES_AXES, placed.affine(),
                             datasets=placed.datasets)
    elif study.image.is_file():
        image = read_nifti_bounded(study.image, limits)
        raw = np.moveaxis(np.asarray(image.dataobj, dtype=np.float32), SLICE_AXIS, 0)
        volume = StudyVolume(normalise_intensity(raw), NIFTI_AXES, np.asarray(image.affine),
                             header=image.header)
    else:
        raise DicomReadError("missing", f"{study.identifier}: no such file or folder")
    if study.mask is not None:
        if not study.mask.is_file():
            raise DicomReadError("missing", f"mask of {study.identifier}: no such file")
        volume.truth = _truth(study.mask, volume, volume.to_nifti_array(raw).shape, limits)
    return volume
