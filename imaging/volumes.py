"""CT volumes at the hospital: a DICOM series folder or a NIfTI file -> the encoder's input.

A DICOM series folder holds one single-frame file per slice. Slices are ordered by their
position along the slice normal (``ImagePositionPatient`` projected on the cross product of
``ImageOrientationPatient``'s row and column directions), the voxel spacing comes from
``PixelSpacing`` and the distance between slice positions, and the values are Hounsfield units
from ``RescaleSlope``/``RescaleIntercept`` (no VOI window: the encoder has its own HU range).
A NIfTI file (``.nii``/``.nii.gz``, read with nibabel) carries its values and affine as stored.
Both become a MONAI ``MetaTensor`` with a RAS affine, then go through
:func:`models.volume_transforms.ct_volume_transform`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from imaging.dicom import DicomReadError, read_dataset
from imaging.guard import ReadLimits, geometry
from models.volume_transforms import ct_volume_transform

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SPACING_TOLERANCE = 0.01
"""Largest relative deviation of one slice gap from the median gap (else: missing slices)."""
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_nifti(path: Path) -> bool:
    """Whether ``path`` names a NIfTI file (by its suffix)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def _attribute(ds, name: str, path: Path, count: int) -> np.ndarray:
    value = ds.get(name)
    if value is None or len(value) != count:
        raise DicomReadError("unsupported", f"{path.name}: no {name} ({count} values): a CT "
                             "series needs it to place its slices; export the full headers")
    return np.asarray([float(v) for v in value])


@dataclass(frozen=True)
class PlacedSeries:
    """A series folder's slices, headers read and checked, in increasing position.

    Attributes:
        files: the slice files, in position order.
        datasets: their headers (pixel data left in the files), same order.
        row_dir, col_dir, normal: unit vectors (LPS) of the rows, the columns and the normal.
        gap: distance between consecutive slice positions in millimetres.
        origin: ``ImagePositionPatient`` (LPS mm) of the first slice.
        pixel_spacing: ``PixelSpacing`` (between rows, between columns) in millimetres.
    """

    files: list[Path]
    datasets: list[Dataset]
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    gap: float
    origin: np.ndarray
    pixel_spacing: np.ndarray

    def affine(self) -> np.ndarray:
        """``(4, 4)`` RAS affine of the ``(I columns, J rows, K slices)`` voxel grid."""
        affine = np.eye(4)
        affine[:3, 0] = self.row_dir * self.pixel_spacing[1]
        affine[:3, 1] = self.col_dir * self.pixel_spacing[0]
        affine[:3, 2] = self.normal * self.gap
        affine[:3, 3] = self.origin
        return LPS_TO_RAS @ affine  # DICOM patient space is LPS


def _headers(folder: Path, files: list[Path], limits: ReadLimits) -> list[tuple[Path, Dataset]]:
    """Each file's header, its declared pixel layout bounded (one frame each, the series'
    decoded size under ``limits.max_pixel_bytes``) before anything is decoded."""
    slices, total = [], 0
    for path in files:
        ds = read_dataset(path, limits)
        shape = geometry(ds, limits)
        if shape.frames != 1:
            raise DicomReadError("unsupported", f"{path.name}: {shape.frames} frames; a series "
                                 "folder holds one single-frame image per slice")
        total += shape.rows * shape.columns * 4  # decoded as float32
        if total > limits.max_pixel_bytes:
            raise DicomReadError("too-large", f"{folder}: its slices would decode to more than "
                                 f"{limits.max_pixel_bytes >> 20} MiB (max_pixel_bytes): "
                                 "nothing was decoded")
        slices.append((path, ds))
    return slices


def place_series(folder: Path, files: list[Path] | None = None,
                 limits: ReadLimits | None = None) -> PlacedSeries:
    """Read a series folder's headers and order its slices along the slice normal.

    ``files``: the folder's slice files as the caller vetted them (e.g. none outside the site's
    data roots); default: every visible file in the folder.

    Raises:
        DicomReadError: no files, a file that is not DICOM or declares too many pixels, slices
            of different series or orientation, two slices at one position, or uneven slice
            gaps (missing slices).
    """
    folder = Path(folder)
    if files is None:
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and not p.name.startswith("."))
    if len(files) < 2:
        raise DicomReadError("missing", f"series folder {folder} holds {len(files)} files: a "
                             "volume needs at least two slices")
    slices = _headers(folder, files, limits or ReadLimits())
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise DicomReadError("bad-values", f"{folder} mixes {len(series)} series: one folder "
                             "must hold one series")
    orientation = _attribute(slices[0][1], "ImageOrientationPatient", slices[0][0], 6)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    placed = []
    for path, ds in slices:
        if not np.allclose(_attribute(ds, "ImageOrientationPatient", path, 6), orientation,
                           atol=1e-4):
            raise DicomReadError("bad-values", f"{path.name}: its orientation differs from the "
                                 "series': one folder must hold one series")
        position = _attribute(ds, "ImagePositionPatient", path, 3)
        placed.append((float(position @ normal), position, path, ds))
    placed.sort(key=lambda item: item[0])
    gaps = np.diff([item[0] for item in placed])
    if (gaps <= 1e-6).any():
        raise DicomReadError("duplicate", f"{folder}: two slices share a position: the "
                             "folder holds a slice twice or two series")
    gap = float(np.median(gaps))
    if np.abs(gaps - gap).max() > SPACING_TOLERANCE * gap:
        raise DicomReadError("bad-values", f"{folder}: slice gaps range from {gaps.min():.3g} "
                             f"to {gaps.max():.3g} mm: slices are missing; export the whole "
                             "series")
    return PlacedSeries([p[2] for p in placed], [p[3] for p in placed], row_dir, col_dir,
                        normal, gap, placed[0][1],
                        _attribute(placed[0][3], "PixelSpacing", placed[0][2], 2))


def series_planes(placed: PlacedSeries) -> np.ndarray:
    """``(K slices, rows, columns)`` float32 values after the Modality LUT (HU for CT), one
    decoded plane per file, in position order.

    Raises:
        DicomReadError: a slice without pixel data, that cannot be decoded, of another size,
            or with non-finite values.
    """
    planes = []
    for path, ds in zip(placed.files, placed.datasets, strict=True):
        if "PixelData" not in ds:
            raise DicomReadError("no-pixels", f"{path.name}: no pixel data")
        try:
            values = apply_modality_lut(ds.pixel_array, ds)
        except Exception as err:  # noqa: BLE001 - decoders raise many types on damaged data
            raise DicomReadError("unreadable", f"{path.name}: pixel data cannot be decoded "
                                 f"({type(err).__name__}); export it again") from err
        planes.append(np.asarray(values, dtype=np.float32))
    if len({p.shape for p in planes}) > 1:
        raise DicomReadError("bad-values", f"{placed.files[0].parent}: slices differ in size")
    stacked = np.stack(planes)
    if not np.isfinite(stacked).all():
        raise DicomReadError("bad-values", f"{placed.files[0].parent}: values are not finite "
                             "after Rescale Slope/Intercept: fix them in the export")
    return stacked


def read_dicom_series(folder: Path,
                      files: list[Path] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A series folder's voxels in HU and their RAS affine.

    ``files``: the folder's slice files as the caller vetted them (e.g. none outside the site's
    data roots); default: every visible file in the folder.

    Returns:
        ``(I, J, K)`` float32 HU (I along the rows' direction, J along the columns', K along
        the slice normal, slices in increasing position) and the ``(4, 4)`` affine mapping voxel
        indices to RAS millimetres.

    Raises:
        DicomReadError: see :func:`place_series` and :func:`series_planes`.
    """
    placed = place_series(folder, files)
    # Each plane is (rows, columns): the column index runs along the row direction.
    voxels = series_planes(placed).transpose(2, 1, 0)  # (I columns, J rows, K slices)
    return np.ascontiguousarray(voxels), placed.affine()


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI file's values (as stored, HU for CT) and its RAS affine."""
    import nibabel

    try:
        image = nibabel.load(str(path))
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as err:  # noqa: BLE001 - nibabel raises many types on damaged files
        raise DicomReadError("unreadable", f"not a readable NIfTI file ({type(err).__name__}: "
                             f"{err})") from err
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DicomReadError("unsupported", f"NIfTI image of shape {data.shape}: a CT volume "
                             "has three dimensions")
    return data, np.asarray(image.affine, dtype=np.float64)


def read_volume(path: Path, files: list[Path] | None = None) -> MetaTensor:
    """``(1, I, J, K)`` HU with its RAS affine, from a series folder (its ``files``, default
    all) or a NIfTI file.

    Raises:
        DicomReadError: the file or folder gives no usable volume; the message says why.
    """
    path = Path(path)
    if path.is_dir():
        voxels, affine = read_dicom_series(path, files)
    elif path.is_file() and is_nifti(path):
        voxels, affine = read_nifti(path)
    elif path.is_file():
        raise DicomReadError("unsupported", f"{path.name}: a volume is a DICOM series folder "
                             "or a .nii/.nii.gz file")
    else:
        raise DicomReadError("missing", "file not found: fix the path (relative to the "
                                        "manifest's folder) or remove the row")
    return MetaTensor(torch.from_numpy(voxels)[None], affine=torch.from_numpy(affine))


def volume_model_input(path: Path, size: int, files: list[Path] | None = None,
                       pixdim: tuple[float, float, float] | None = None) -> np.ndarray:
    """``(1, 1, size, size, size)`` float32 in [0, 1]: one "frame" of the site's image set.

    Raises:
        DicomReadError: no usable volume, or a volume of one value (nothing to learn from).
    """
    volume = read_volume(path, files)
    if float(volume.max()) == float(volume.min()):
        raise DicomReadError("bad-values", f"every voxel is {float(volume.min()):g} HU: check "
                             "Rescale Slope/Intercept in the export")
    out = ct_volume_transform(size, pixdim)(volume)
    return np.asarray(out.as_tensor() if isinstance(out, MetaTensor) else out,
                      dtype=np.float32)[None]
