"""DICOM files to float pixel arrays, with pydicom and its pixel-data plugins, one frame at a time.

Grayscale: Modality LUT (Rescale Slope/Intercept, or a Modality LUT table) then the VOI LUT or
window the file carries, in float32; MONOCHROME1 is flagged for inversion. Colour: YCbCr is
converted to RGB by pydicom, PALETTE COLOR through its palette (``apply_color_lut``). Compressed
transfer syntaxes are decoded by pydicom's pixel handlers; the plugins medfed installs
(pylibjpeg with -libjpeg, -openjpeg and -rle, and Pillow) cover JPEG Baseline/Extended/Lossless,
JPEG-LS, JPEG 2000, HTJ2K, RLE and Deflate, besides the uncompressed syntaxes; see
:func:`supported_transfer_syntaxes`.

Files are treated as possibly hostile (see :mod:`imaging.guard`): the header's pixel layout
is bounded before anything is decoded, only the frames that are kept are decoded (from the file,
not a copy of all its pixel data), non-image objects (SEG, RT Dose, SR...) are refused, and every
decoder failure is a :class:`DicomReadError` naming what is wrong.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, iter_pixels
from pydicom.pixels import pixel_array as decode_pixels
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless

from imaging.guard import (
    INFLATE_HEADER_ALLOWANCE,
    DicomReadError,
    Geometry,
    Notes,
    ReadLimits,
    captured,
    check_codestream,
    check_rle_frame,
    geometry,
    guarded,
    inflate_bounded,
)

__all__ = ["DecodedImage", "DicomReadError", "ReadLimits", "read_dataset", "read_dicom",
           "iter_decoded", "supported_transfer_syntaxes"]

DEFER_BYTES = 64 * 1024
"""Elements larger than this (pixel data above all) are not read when the header is parsed."""

NON_IMAGE_MODALITIES = frozenset({
    "SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTSEGANN", "SR", "KO", "PR", "REG",
    "FID", "RWV", "DOC", "PLAN", "AU", "ECG", "HD", "EPS", "RESP", "EEG", "EMG", "EOG"})
"""Modalities whose objects hold no picture of the patient (segmentations, dose grids, ...)."""

IMAGE_HEADER = ("Rows", "Columns", "BitsAllocated")
"""Attributes every image's header holds before its pixel data."""


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
        patient_ids: the Patient ID of each file read (stays in the hospital).
    """

    frames: np.ndarray
    invert: bool
    rgb_max: float
    sop_uids: list[str]
    value_range: tuple[float, float] | None = None
    patient_ids: list[str] = field(default_factory=list)


def supported_transfer_syntaxes() -> list[str]:
    """Names of the transfer syntaxes this installation can decode."""
    from pydicom.uid import AllTransferSyntaxes, UncompressedTransferSyntaxes

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


def _check_decodable(syntax: UID | None) -> None:
    if syntax is None or not syntax.is_transfer_syntax or not syntax.is_compressed:
        return  # pydicom guesses; a failure surfaces as unreadable below
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


@dataclass
class DicomFile:
    """A parsed header and where its pixel data is: the file (read per frame) or, for a
    deflated file, the inflated dataset in memory."""

    path: Path
    ds: Dataset
    in_memory: bool
    notes: Notes
    cut_short: bool = False  # an element's value runs past the end of the file
    small: bool = True  # small enough to decode from the dataset (pixel data read whole)


def _runs_past_end(ds: Dataset, size: int) -> bool:
    """Whether an element pydicom has not converted yet declares a value past the file's end
    (pydicom drops a cut-off last element silently)."""
    for element in ds._dict.values():
        tell, length = getattr(element, "value_tell", None), getattr(element, "length", None)
        if tell is not None and length is not None and length != 0xFFFFFFFF \
                and tell + length > size:
            return True
    return False


def _read_inflated(path: Path, limits: ReadLimits) -> Dataset:
    # pydicom inflates a deflated dataset whole and unbounded; inflate it here in bounded steps
    # and parse the result as the Explicit VR Little Endian dataset it is.
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as handle:
        read_preamble(handle, False)
        meta = _read_file_meta_info(handle)
        offset = handle.tell()
    body = inflate_bounded(path, offset, limits.max_frame_bytes + INFLATE_HEADER_ALLOWANCE)
    dataset = pydicom.filereader.read_dataset(io.BytesIO(body), False, True)
    plain = FileMetaDataset(meta)
    plain.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.dataset.FileDataset(str(path), dataset, file_meta=plain,
                                     is_implicit_VR=False, is_little_endian=True)
    return ds


def _open(path: Path, limits: ReadLimits, notes: Notes) -> DicomFile:
    with captured(notes):
        try:
            if path.stat().st_size == 0:
                raise DicomReadError("truncated", "the file is empty (0 bytes), e.g. after an "
                                                  "interrupted copy or export: export it again")
            meta = pydicom.filereader.read_file_meta_info(path)
            deflated = meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
            if deflated:
                return DicomFile(path, _read_inflated(path, limits), True, notes)
            ds = pydicom.dcmread(path, defer_size=DEFER_BYTES)
            size = path.stat().st_size
            return DicomFile(path, ds, False, notes, _runs_past_end(ds, size),
                             size <= limits.max_frame_bytes + INFLATE_HEADER_ALLOWANCE)
        except DicomReadError:
            raise
        except InvalidDicomError as err:
            raise DicomReadError(
                "not-dicom", "not a DICOM file (no 'DICM' marker after the 128-byte preamble): "
                "export it from PACS as a DICOM Part 10 file or remove the row") from err
        except OSError as err:
            if "No tag to read" in str(err):
                raise DicomReadError("truncated", "the file ends inside a sequence: it is "
                                                  "truncated; export it again") from err
            raise DicomReadError("unreadable", f"cannot read the file ({err})") from err
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001 - pydicom raises many types on damaged files
            kind = "truncated" if isinstance(err, EOFError | struct.error) \
                or notes.any("End of file") else "unreadable"
            raise DicomReadError(
                kind, f"{'truncated' if kind == 'truncated' else 'damaged'} DICOM file "
                f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); export it again "
                "from PACS") from err


def read_dataset(path: Path, limits: ReadLimits | None = None) -> Dataset:
    """Parse one DICOM file's header (pixel data is left in the file), with errors that say
    what is wrong with it. A deflated file is inflated, bounded by ``limits``."""
    return _open(Path(path), limits or ReadLimits(), Notes()).ds


def _sop_name(ds: Dataset) -> str:
    """The SOP class's name (its UID when pydicom does not know it; "" when absent)."""
    sop = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None),
                                           "MediaStorageSOPClassUID", None)
    return UID(str(sop)).name if sop else ""


def _refuse_non_images(ds: Dataset) -> None:
    sop = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None),
                                           "MediaStorageSOPClassUID", None)
    name = _sop_name(ds)
    modality = str(ds.get("Modality", "") or "").upper()
    not_image = (bool(name) and "Storage" in name and "Image" not in name) \
        or modality in NON_IMAGE_MODALITIES
    if not_image:
        what = name if name and name != str(sop) else f"modality {modality or '?'}"
        raise DicomReadError(
            "not-image", f"a {what} object, not an image of the patient (segmentations, dose "
                         "grids, structure sets and reports are not training images): remove "
                         "the row")


def _has_pixel_tag(path: Path) -> bool:
    """Whether the bytes of the Pixel Data tag (7FE0,0010) occur in the file: pydicom found no
    pixel data, so it ended inside the element."""
    tag, tail = b"\xe0\x7f\x10\x00", b""
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            if tag in tail + chunk:
                return True
            tail = chunk[-3:]
    return False


def _where(ds: Dataset) -> str:
    """The last element a parsed dataset holds, e.g. ``after (0010,0020) PatientID``."""
    tags = list(ds.keys())
    if not tags:
        return "before the first element of its dataset"
    tag = max(tags)
    return f"after {tag} {keyword_for_tag(tag) or 'a private element'}"


def _refuse_truncated(dicom: DicomFile) -> None:
    """Refuse a file with no pixel data that was cut short: it ends inside its pixel data, or
    inside its header (an element runs past the end, an image's header stops before Rows,
    Columns or Bits Allocated, or no element follows the file meta header).

    Raises:
        DicomReadError: ``truncated``, saying where the file ends and to export it again.
    """
    ds = dicom.ds
    if "PixelData" in ds:
        return
    size = dicom.path.stat().st_size
    said = f"; pydicom: {dicom.notes.summary(1)}" if dicom.notes.lines else ""
    if not dicom.in_memory and _has_pixel_tag(dicom.path):
        raise DicomReadError("truncated", f"the file ends inside its pixel data (it stops after "
                             f"{size:,} bytes{said}): it is truncated; export it again")
    name = _sop_name(ds)
    # An image's header stops before Rows, Columns or Bits Allocated; or nothing at all
    # follows the file meta header (which may itself be cut: its SOP class UID a stump)
    incomplete = any(k not in ds for k in IMAGE_HEADER) and (
        not name or "Image" in name or not len(ds))
    if dicom.notes.any("End of file") or dicom.cut_short or incomplete:
        raise DicomReadError(
            "truncated", f"the file ends inside its header, before its pixel data (it stops "
            f"after {size:,} bytes, {_where(ds)}{said}): it is truncated, e.g. by an "
            "interrupted copy or export; export it again")


def _check_pixel_data(dicom: DicomFile, shape: Geometry) -> None:
    ds, notes = dicom.ds, dicom.notes
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise DicomReadError("unsupported", "float pixel data (parametric maps) is not a "
                                                "supported image: remove the row")
        if notes.any("End of file") or (not dicom.in_memory and _has_pixel_tag(dicom.path)):
            raise DicomReadError("truncated", "the header declares an image "
                                 f"({shape.rows} x {shape.columns}) but the file ends inside "
                                 "its pixel data: the file is truncated; export it again")
        raise DicomReadError("no-pixels", "no pixel data although the header declares an image "
                             f"({shape.rows} x {shape.columns}): the file may be cut short or "
                             "exported without pixels; export it again or remove the row")
    if notes.any("End of file", "truncat"):
        raise DicomReadError("truncated", "the file ends inside its pixel data: it is "
                             f"truncated ({notes.summary(1)}); export it again")
    if dicom.in_memory:
        return
    element = ds._dict[0x7FE00010]
    length = getattr(element, "length", None)
    tell = getattr(element, "value_tell", None)
    if length is not None and tell is not None and length != 0xFFFFFFFF:
        size = dicom.path.stat().st_size
        if tell + length > size:
            raise DicomReadError("truncated", f"the pixel data should hold {length} bytes but "
                                 f"the file ends after {max(size - tell, 0)}: the file is "
                                 "truncated; export it again")
        subsampled = str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422"
        if length < shape.total_bytes * (2 / 3 if subsampled else 1):
            raise DicomReadError("truncated", f"the pixel data holds {length} bytes, fewer "
                                 f"than the {shape.total_bytes} its header declares: the file "
                                 "is truncated; export it again")


def _check_frames(dicom: DicomFile, indices: list[int], shape: Geometry, syntax: UID) -> None:
    """The kept encapsulated frames' own headers, read from the file (one frame in memory at a
    time) and checked before any of them is decoded."""
    from pydicom.encaps import generate_frames, get_frame

    element = dicom.ds._dict[0x7FE00010]
    tell = getattr(element, "value_tell", None)
    if tell is None:
        return
    wanted = set(indices)
    with open(dicom.path, "rb") as handle:
        handle.seek(tell)
        if len(indices) == 1:
            frames = iter([(indices[0], guarded(
                "truncated", "frame data cannot be found; the file is truncated or damaged",
                lambda: get_frame(handle, indices[0], number_of_frames=shape.frames)))])
        else:
            frames = enumerate(generate_frames(handle, number_of_frames=shape.frames))
        while True:
            item = guarded("truncated", "frame data cannot be found; the file is truncated or "
                           "damaged", lambda: next(frames, None))
            if item is None:
                break
            index, frame = item
            if index not in wanted:
                continue
            if syntax == RLELossless:
                check_rle_frame(frame, shape)
            else:
                check_codestream(frame, syntax, shape)


def _frame_indices(frames: int, mode: str) -> list[int]:
    return list(range(frames)) if mode == "all" else [frames // 2]


def _decode_error(dicom: DicomFile, err: DicomReadError) -> DicomReadError:
    if dicom.notes.lines and dicom.notes.summary(1) not in err.reason:
        err.reason += f" [pydicom: {dicom.notes.summary(1)}]"
    if "length" in err.reason and ("expected" in err.reason or "match" in err.reason):
        err.kind = "truncated"
    return err


def _decoded_frames(dicom: DicomFile, indices: list[int], shape: Geometry
                    ) -> Iterator[np.ndarray]:
    """The frames at ``indices``, ``(H, W)`` or ``(H, W, S)`` each, decoded one at a time from
    the file (or the inflated dataset); one parse of the file for all of them."""
    # A small file decodes from its dataset (pixel data read whole, as robust as pydicom's own
    # ds.pixel_array); a large one frame by frame from the file.
    source = dicom.ds if dicom.in_memory or dicom.small else str(dicom.path)
    what = "pixel data cannot be decoded; the file is truncated or damaged: export it again"
    if shape.frames == 1 or len(indices) == 1:
        index = indices[0] if shape.frames > 1 else None

        def one() -> np.ndarray:
            with captured(dicom.notes):
                return decode_pixels(source, index=index)

        try:
            yield guarded("unreadable", what, one)
        except DicomReadError as err:
            raise _decode_error(dicom, err) from err.__cause__
        return
    frames = iter_pixels(source, indices=indices)

    def step() -> np.ndarray:
        with captured(dicom.notes):
            return next(frames)

    for _ in indices:
        try:
            yield guarded("unreadable", what, step)
        except DicomReadError as err:
            raise _decode_error(dicom, err) from err.__cause__


def _number(ds: Dataset, keyword: str, default: float) -> float:
    element = ds.get(keyword)
    if element is None or element == "":
        return default
    value = element
    if isinstance(element, Sequence) and not isinstance(element, str | bytes):
        if not len(element):
            return default
        value = element[0]  # several windows: the first, as viewers show it
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise DicomReadError("bad-values", f"{keyword} = {str(value)[:40]!r} is not a number: "
                             "fix it in the export (a decimal point, not a comma)") from err
    if not np.isfinite(number):
        raise DicomReadError("bad-values", f"{keyword} = {value!r} is not a finite number: "
                                           "fix it in the export")
    return number


def _rescale(ds: Dataset, frame: np.ndarray) -> np.ndarray:
    """Modality LUT in float32: a Modality LUT table, or Rescale Slope/Intercept."""
    if ds.get("ModalityLUTSequence"):
        frame = guarded("bad-values", "the Modality LUT cannot be applied; fix it in the "
                        "export", lambda: apply_modality_lut(frame, ds))
        return frame.astype(np.float32)
    slope = _number(ds, "RescaleSlope", 1.0)
    intercept = _number(ds, "RescaleIntercept", 0.0)
    values = frame.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported by the caller
        if slope != 1.0:
            values *= np.float32(slope)
        if intercept != 0.0:
            values += np.float32(intercept)
    return values


def _window(ds: Dataset, values: np.ndarray) -> tuple[np.ndarray, tuple[float, float] | None]:
    """The VOI LUT table or window (PS3.3 C.11.2), as a viewer shows it; the output range.

    A window is applied in float32 in place and maps straight to [0, 1]."""
    if "VOILUTSequence" in ds:
        try:
            lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
            out = apply_voi_lut(values, ds, prefer_lut=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001 - odd tables raise many types
            raise DicomReadError("bad-values", f"the VOI LUT cannot be applied ({err}): fix "
                                               "it in the export") from err
        out = np.asarray(out, dtype=np.float32)
        low, high = float(lut.min()), float(lut.max())
        return out, ((low, high) if high > low else None)
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return values, None
    center = _number(ds, "WindowCenter", 0.0)
    width = _number(ds, "WindowWidth", 0.0)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function == "LINEAR":
        if width < 1:
            raise DicomReadError("bad-values", f"Window Width {width:g} is below 1: fix the "
                                               "window in the export")
        center, width = center - 0.5, width - 1
        if width == 0:  # a step at the centre
            return (values > center).astype(np.float32), (0.0, 1.0)
    elif function in ("LINEAR_EXACT", "SIGMOID"):
        if width <= 0:
            raise DicomReadError("bad-values", f"Window Width {width:g} must be above 0: fix "
                                               "the window in the export")
    else:
        raise DicomReadError("bad-values", f"VOI LUT Function {function!r} is not LINEAR, "
                                           "LINEAR_EXACT or SIGMOID: fix it in the export")
    values -= np.float32(center)
    values /= np.float32(width)
    if function == "SIGMOID":
        with np.errstate(over="ignore"):
            np.exp(-4.0 * values, out=values)
        values += 1.0
        np.reciprocal(values, out=values)
    else:
        values += 0.5
        np.clip(values, 0.0, 1.0, out=values)
    return values, (0.0, 1.0)


STRIP_BYTES = 4 * 2**20
"""Large frames are converted to float in strips of about this many bytes (see :func:`_reduce`)."""


def _block_mean(values: np.ndarray, k: int) -> np.ndarray:
    """Mean over ``k`` x ``k`` blocks of the first two axes (the last blocks may be smaller)."""
    rows, cols = np.arange(0, values.shape[0], k), np.arange(0, values.shape[1], k)
    sums = np.add.reduceat(np.add.reduceat(values.astype(np.float64), rows, axis=0), cols,
                           axis=1)
    counts = np.outer(np.diff(np.append(rows, values.shape[0])),
                      np.diff(np.append(cols, values.shape[1])))
    if sums.ndim == 3:
        counts = counts[..., None]
    return (sums / counts).astype(np.float32)


def _reduce(frame: np.ndarray, k: int, pointwise) -> np.ndarray:
    """``pointwise(frame)`` as float32, then the mean of each ``k`` x ``k`` block.

    With ``k`` > 1 the frame is converted in strips of ``k``-row multiples, so a large frame
    never exists in float32 whole: memory stays near the decoded frame's own size.
    """
    if k <= 1:
        return pointwise(frame)
    step = k * max(1, STRIP_BYTES // (k * frame[0].size * 8))
    return np.concatenate([_block_mean(pointwise(frame[r:r + step]), k)
                           for r in range(0, frame.shape[0], step)])


def _values(ds: Dataset, frame: np.ndarray, shape: Geometry, shrink_to: int | None = None
            ) -> tuple[np.ndarray, bool, float, tuple[float, float] | None]:
    """``(C, H, W)`` float32 values, MONOCHROME1 flag, RGB maximum, VOI output range.

    ``shrink_to``: the model's input side; a frame more than twice as large is reduced by
    block means to between 2 and 4 times that side (the transforms' area resize does the rest),
    after the pointwise Modality LUT, window and palette, in strips.
    """
    k = max(1, min(frame.shape[0], frame.shape[1]) // (2 * shrink_to)) if shrink_to else 1
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        rgb_dtype = []

        def palette(part: np.ndarray) -> np.ndarray:
            rgb = guarded("bad-values", "the palette (Red/Green/Blue Palette Color LUT) cannot "
                          "be applied; fix it in the export", lambda: apply_color_lut(part, ds))
            rgb_dtype.append(rgb.dtype)
            return rgb.astype(np.float32)

        rgb = _reduce(frame, k, palette)
        top = 255.0 if rgb_dtype[0] == np.uint8 else 65535.0
        return np.moveaxis(rgb, -1, 0), False, top, None
    if shape.samples == 1:
        ranges = []

        def gray(part: np.ndarray) -> np.ndarray:
            values, value_range = _window(ds, _rescale(ds, part))
            ranges.append(value_range)
            return values

        values = _reduce(frame.reshape(frame.shape[-2:]), k, gray)
        if not np.isfinite(values).all():
            raise DicomReadError(
                "bad-values", "pixel values are not finite after Rescale Slope/Intercept "
                f"({ds.get('RescaleSlope', 1)}, {ds.get('RescaleIntercept', 0)}): fix the "
                "rescale attributes in the export")
        return values[None], photometric == "MONOCHROME1", 0.0, ranges[0]
    if shape.samples != 3:
        raise DicomReadError("unsupported", f"{shape.samples} samples per pixel: only 1 "
                                            "(grayscale) and 3 (colour) are supported")
    bits = int(ds.get("BitsStored", 8) or 8)
    rgb = _reduce(frame, k, lambda part: part.astype(np.float32))
    return np.moveaxis(rgb, -1, 0), False, float(2**bits - 1), None


@dataclass
class DecodedFrame:
    """One decoded frame of one file: ``values`` ``(C, H, W)`` float32 plus how to scale it."""

    values: np.ndarray
    invert: bool
    rgb_max: float
    value_range: tuple[float, float] | None


@dataclass
class FileFrames:
    """A file's identity (read before decoding) and a generator of its kept frames."""

    path: Path
    sop_uid: str
    patient_id: str
    frames: Iterator[DecodedFrame]


def open_image(path: Path, frames: str = "middle", limits: ReadLimits | None = None,
               shrink_to: int | None = None) -> FileFrames:
    """Parse and check one file; its kept frames decode lazily, one at a time.

    ``shrink_to``: see :func:`_values` (None: full resolution).

    Raises:
        DicomReadError: not DICOM, damaged, truncated, not an image, too large, unsupported.
    """
    limits = limits or ReadLimits()
    dicom = _open(Path(path), limits, Notes())
    ds = dicom.ds
    with captured(dicom.notes):  # reading a header value may warn (e.g. a malformed UID)
        shape = _checked_header(dicom, limits)
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if not dicom.in_memory:
            _check_decodable(syntax)
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        patient_id = str(ds.get("PatientID", "") or "").strip()
    indices = _frame_indices(shape.frames, frames)

    def generate() -> Iterator[DecodedFrame]:
        if syntax is not None and syntax.is_compressed and not dicom.in_memory:
            _check_frames(dicom, indices, shape, syntax)
        for frame in _decoded_frames(dicom, indices, shape):
            with captured(dicom.notes):
                values, invert, rgb_max, value_range = _values(ds, frame, shape, shrink_to)
            yield DecodedFrame(values, invert, rgb_max, value_range)

    return FileFrames(Path(path), sop_uid, patient_id, generate())


def _checked_header(dicom: DicomFile, limits: ReadLimits) -> Geometry:
    """The pixel layout of an image file, after refusing non-images, truncated files, files
    without pixel data and layouts above ``limits``.

    Raises:
        DicomReadError: not-image, truncated, no-pixels, too-large or bad-values.
    """
    ds = dicom.ds
    _refuse_non_images(ds)
    _refuse_truncated(dicom)
    if "Rows" not in ds and "PixelData" not in ds:
        name = _sop_name(ds)
        kind = f" ({name})" if name else ""
        raise DicomReadError("no-pixels", f"no pixel data{kind}: this is not an image; "
                                          "remove the row")
    shape = geometry(ds, limits)
    _check_pixel_data(dicom, shape)
    return shape


def _sort_key(ds: Dataset) -> tuple[float, float]:
    position = ds.get("ImagePositionPatient")
    try:
        z = float(position[2]) if position is not None and len(position) == 3 else 0.0
        return float(ds.get("InstanceNumber", 0) or 0), z
    except (TypeError, ValueError):
        return 0.0, 0.0


def iter_decoded(path: Path, frames: str = "middle", limits: ReadLimits | None = None,
                 series: list[Path] | None = None, shrink_to: int | None = None
                 ) -> Iterator[FileFrames]:
    """The files of one manifest row, each with its kept frames (decoded lazily).

    Args:
        path: a DICOM file, or a folder whose files are one series (ordered by Instance Number,
            then z position).
        frames: ``middle`` keeps the middle frame (or slice), ``all`` keeps every one.
        limits: header bounds checked before decoding.
        series: a series folder's files, already listed and confined by the caller; default:
            the folder's files (hidden ones skipped).
        shrink_to: the model's input side, to reduce large frames early (see :func:`_values`);
            None keeps full resolution.

    Raises:
        DicomReadError: missing, not DICOM, damaged, truncated, unsupported, not an image,
            too large, no pixels or bad values.
    """
    path = Path(path)
    limits = limits or ReadLimits()
    if path.is_dir():
        files = series if series is not None else sorted(
            p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DicomReadError("missing", f"series folder {path.name} holds no files")
        headers = sorted(((read_dataset(p, limits), p) for p in files),
                         key=lambda item: _sort_key(item[0]))
        chosen = [headers[len(headers) // 2][1]] if frames == "middle" else \
            [p for _, p in headers]
        for file in chosen:
            yield open_image(file, frames, limits, shrink_to)
    elif path.is_file():
        yield open_image(path, frames, limits, shrink_to)
    else:
        raise DicomReadError("missing", "file not found: fix the path (relative to the "
                                        "manifest's folder) or remove the row")


def read_dicom(path: Path, frames: str = "middle", limits: ReadLimits | None = None
               ) -> DecodedImage:
    """Decode a DICOM file, or a series folder of single-frame files, into one array.

    Args:
        path: a DICOM file, or a folder whose files are one series.
        frames: ``middle`` keeps the middle frame (or slice), ``all`` keeps every one.
        limits: header bounds checked before decoding (default :class:`ReadLimits`).

    Raises:
        DicomReadError: see :func:`iter_decoded`.
    """
    parts, uids, patients = [], [], []
    invert, rgb_max, value_range = False, 0.0, None
    for file in iter_decoded(path, frames, limits):
        for frame in file.frames:
            parts.append(frame.values)
            invert, rgb_max, value_range = frame.invert, frame.rgb_max, frame.value_range
        uids.append(file.sop_uid)
        patients.append(file.patient_id)
    shapes = {p.shape for p in parts}
    if len(shapes) > 1:
        raise DicomReadError("bad-values", f"series images differ in size {sorted(shapes)}: "
                                           "one series folder must hold one series")
    return DecodedImage(np.stack(parts), invert, rgb_max, [u for u in uids if u], value_range,
                        patients)
