"""DICOM files to float pixel arrays, with pydicom and its pixel-data plugins.

Grayscale: Modality LUT (Rescale Slope/Intercept) then the VOI LUT or window the file carries;
MONOCHROME1 is flagged for inversion. Colour: YCbCr is converted to RGB by pydicom. Compressed
transfer syntaxes are decoded by pydicom's pixel handlers; the plugins medfed installs
(pylibjpeg with -libjpeg, -openjpeg and -rle, and Pillow) cover JPEG Baseline/Extended/Lossless,
JPEG-LS, JPEG 2000, HTJ2K, RLE and Deflate, besides the uncompressed syntaxes; see
:func:`supported_transfer_syntaxes`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

logger = logging.getLogger(__name__)


class DicomReadError(Exception):
    """A file that gives no image; ``kind`` is a :data:`client.data.problems.KINDS` entry."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass
class DecodedImage:
    """Pixel values of one file or series before resizing.

    Attributes:
        frames: ``(F, C, H, W)`` float32; grayscale after Modality and VOI LUT, RGB as stored.
        invert: MONOCHROME1 (larger value = darker): invert after scaling.
        rgb_max: largest possible RGB value (255 for 8 bits) or 0 for grayscale.
        sop_uids: SOP Instance UIDs of the files read (one per file in a series).
        value_range: grayscale output range of the VOI LUT/window (maps to [0, 1]); None when
            the file has no window: the image's own minimum and maximum map to [0, 1].
    """

    frames: np.ndarray
    invert: bool
    rgb_max: float
    sop_uids: list[str]
    value_range: tuple[float, float] | None = None


def supported_transfer_syntaxes() -> list[str]:
    """Names of the transfer syntaxes this installation can decode."""
    from pydicom.uid import (
        AllTransferSyntaxes,
        UncompressedTransferSyntaxes,
    )

    names = []
    for uid in AllTransferSyntaxes:
        if uid in UncompressedTransferSyntaxes:
            names.append(UID(uid).name)
            continue
        try:
            if get_decoder(uid).is_available:
                names.append(UID(uid).name)
        except NotImplementedError:
            continue
    return names


def _check_decodable(ds: Dataset) -> None:
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None or not syntax.is_transfer_syntax:
        return  # pydicom guesses; a failure surfaces as unreadable below
    if not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as err:
        raise DicomReadError(
            "unsupported", f"transfer syntax '{syntax.name}' ({syntax}) cannot be decoded by "
            "pydicom: re-export the study uncompressed or as JPEG 2000 / JPEG-LS / RLE") from err
    if not decoder.is_available:
        raise DicomReadError(
            "unsupported", f"transfer syntax '{syntax.name}' needs a pixel-data plugin that is "
            f"not installed ({decoder.missing_dependencies}): install medfed's dependencies again "
            "(pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle)")


def read_dataset(path: Path) -> Dataset:
    """Parse one DICOM file, with errors that say what is wrong with it."""
    try:
        # Reading a damaged file makes pydicom warn before it fails; the error says it all.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path)
    except InvalidDicomError as err:
        raise DicomReadError(
            "not-dicom", "not a DICOM file (no 'DICM' marker after the 128-byte preamble): export "
            "it from PACS as a DICOM Part 10 file or remove the row") from err
    except OSError as err:
        raise DicomReadError("unreadable", f"cannot read the file ({err})") from err
    except Exception as err:  # noqa: BLE001 - pydicom raises many types on damaged files
        raise DicomReadError(
            "unreadable", f"truncated or damaged DICOM file ({type(err).__name__}: {err}); "
            "export it again from PACS") from err


def _pixels(ds: Dataset) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = ds.get("SOPClassUID")
        kind = f" ({UID(sop).name})" if sop else ""
        raise DicomReadError(
            "no-pixels", f"no pixel data{kind}: this is not an image; remove the row")
    _check_decodable(ds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.pixel_array
    except Exception as err:  # noqa: BLE001 - decoders raise many types on damaged data
        raise DicomReadError(
            "unreadable", f"pixel data cannot be decoded ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:240]}); the file is truncated or damaged: export it "
            "again") from err


def _frames(ds: Dataset, arr: np.ndarray) -> tuple[np.ndarray, bool, float]:
    """``(F, C, H, W)`` float32 values, MONOCHROME1 flag, RGB maximum, VOI output range."""
    samples = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if samples == 1:
        arr = arr.reshape((frames, *arr.shape[-2:]))
        values = apply_modality_lut(arr, ds)
        value_range = None
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            try:
                values = apply_voi_lut(values, ds, prefer_lut=True)
            except (ValueError, IndexError, TypeError) as err:
                raise DicomReadError("bad-values", f"the VOI LUT/window cannot be applied "
                                     f"({err}): fix Window Center/Width in the export") from err
            value_range = _voi_output_range(ds, values)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below
            values = np.asarray(values, dtype=np.float32)[:, None]
        if not np.isfinite(values).all():
            raise DicomReadError(
                "bad-values", "pixel values are not finite after Rescale Slope/Intercept "
                f"({ds.get('RescaleSlope', 1)}, {ds.get('RescaleIntercept', 0)}): fix the "
                "rescale attributes in the export")
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        return values, photometric == "MONOCHROME1", 0.0, value_range
    if samples != 3:
        raise DicomReadError("unsupported", f"{samples} samples per pixel: only 1 (grayscale) "
                                            "and 3 (colour) are supported")
    arr = arr.reshape((frames, *arr.shape[-3:]))
    bits = int(ds.get("BitsStored", 8))
    return np.moveaxis(arr, -1, 1).astype(np.float32), False, float(2**bits - 1), None


def _voi_output_range(ds: Dataset, values: np.ndarray) -> tuple[float, float] | None:
    """The VOI transform's output range (its values for inputs far below and above the window),
    so that a window maps to [0, 1] as a viewer shows it; None: use the image's own range."""
    try:
        probe = np.array([-1e12, 1e12], dtype=values.dtype if values.dtype.kind == "f" else
                         np.float64)
        if "VOILUTSequence" in ds and "WindowCenter" not in ds:
            lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
            low, high = float(lut.min()), float(lut.max())
        else:
            low, high = (float(v) for v in apply_voi_lut(probe, ds, prefer_lut=False))
    except Exception:  # noqa: BLE001 - odd VOI attributes: fall back to the image's range
        return None
    return (low, high) if np.isfinite([low, high]).all() and high > low else None


def _select(frames: np.ndarray, mode: str) -> np.ndarray:
    return frames if mode == "all" else frames[len(frames) // 2:len(frames) // 2 + 1]


def _sort_key(ds: Dataset) -> tuple[float, float]:
    position = ds.get("ImagePositionPatient")
    z = float(position[2]) if position is not None and len(position) == 3 else 0.0
    return float(ds.get("InstanceNumber", 0) or 0), z


def read_dicom(path: Path, frames: str = "middle") -> DecodedImage:
    """Decode a DICOM file, or a series folder of single-frame files.

    Args:
        path: a DICOM file, or a folder whose files are one series (ordered by Instance Number,
            then z position).
        frames: ``middle`` keeps the middle frame (or slice), ``all`` keeps every one.

    Raises:
        DicomReadError: missing, not DICOM, damaged, unsupported, no pixels or bad values.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DicomReadError("missing", f"series folder {path} holds no files")
        datasets = sorted((read_dataset(p) for p in files), key=_sort_key)
        if frames == "middle":
            datasets = [datasets[len(datasets) // 2]]
    elif path.is_file():
        datasets = [read_dataset(path)]
    else:
        raise DicomReadError("missing", "file not found: fix the path (relative to the "
                                        "manifest's folder) or remove the row")
    parts, invert, rgb_max, value_range = [], False, 0.0, None
    for ds in datasets:
        values, invert, rgb_max, value_range = _frames(ds, _pixels(ds))
        parts.append(_select(values, frames))
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise DicomReadError("bad-values", f"series images differ in size {sorted(shapes)}: "
                                           "one series folder must hold one series")
    uids = [str(ds.get("SOPInstanceUID", "")) for ds in datasets]
    return DecodedImage(np.concatenate(parts), invert, rgb_max, [u for u in uids if u],
                        value_range)
