"""Bounds and guards around decoding files a hospital may have been handed.

Everything here runs before (or around) a decoder, so that a hostile file costs a row problem,
never the process: the pixel bytes a header declares are bounded before anything is decoded, a
deflated dataset is inflated in bounded steps, RLE and JPEG headers are checked against the
DICOM header (a decoder allocates what the codestream declares), every decoder failure, Rust
panics included, becomes a :class:`DicomReadError`, and pydicom's warnings and log lines for a
file are captured into its row problem instead of being printed.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from core.errors import MedfedError

T = TypeVar("T")

MIB = 2**20
INFLATE_HEADER_ALLOWANCE = MIB
"""A deflated dataset may inflate to its pixel bound plus this much for its other elements."""


class DicomReadError(MedfedError):
    """A file that gives no image; ``kind`` is a :data:`imaging.problems.KINDS` entry."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class ReadLimits:
    """Decoded sizes a file may declare (a hospital sets them in its site data config).

    Attributes:
        max_frame_bytes: most bytes one decoded frame may take.
        max_pixel_bytes: most bytes all frames of one file may take.
    """

    max_frame_bytes: int = 64 * MIB
    max_pixel_bytes: int = 2**30


MAX_NOTES = 20
"""Distinct warnings kept per file or row (a hostile file can make pydicom warn endlessly)."""


@dataclass
class Notes:
    """pydicom's warnings and log lines while one file was read (for its row problem)."""

    lines: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        """Keep ``text`` (whitespace collapsed, 200 characters at most) unless already kept or
        :data:`MAX_NOTES` are."""
        text = " ".join(str(text).split())[:200]
        if text and text not in self.lines and len(self.lines) < MAX_NOTES:
            self.lines.append(text)

    def any(self, *needles: str) -> bool:
        return any(n in line for line in self.lines for n in needles)

    def summary(self, limit: int = 2) -> str:
        return "; ".join(self.lines[:limit])


class _Collect(logging.Handler):
    def __init__(self, notes: Notes) -> None:
        super().__init__(logging.DEBUG)
        self.notes = notes

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            # The message only: pydicom logs each failing plugin with its traceback.
            self.notes.add(record.getMessage())


_open_notes: list[Notes] = []  # the notes of the captured() blocks now open, innermost last


@contextlib.contextmanager
def captured(notes: Notes) -> Iterator[Notes]:
    """Collect pydicom's warnings and log lines into ``notes`` instead of printing them.

    Blocks nest: what an inner block collects is added to the enclosing block's notes too, so a
    row's notes (:func:`imaging.rows.read_row`) hold every warning of its files.
    """
    _open_notes.append(notes)
    try:
        with _collecting(notes):
            yield notes
    finally:
        _open_notes.pop()
        if _open_notes and _open_notes[-1] is not notes:
            for line in notes.lines:
                _open_notes[-1].add(line)


_NOT_THE_FILES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
"""Warnings about the code rather than the file: not a row's notes (warned as usual)."""


def _sort_warnings(caught: list[warnings.WarningMessage],
                   notes: Notes) -> list[warnings.WarningMessage]:
    """The file's warnings into ``notes``; returns a library's deprecation warnings, to go
    back to the warnings filters (which hide them outside ``__main__``) once the block ends."""
    kept = []
    for item in caught:
        if issubclass(item.category, _NOT_THE_FILES):
            kept.append(item)
        else:
            notes.add(str(item.message))
    return kept


@contextlib.contextmanager
def _collecting(notes: Notes) -> Iterator[None]:
    """Warnings (all of them, each time) and pydicom's log lines into ``notes``."""
    pydicom_logger = logging.getLogger("pydicom")
    handler = _Collect(notes)
    propagate = pydicom_logger.propagate
    pydicom_logger.addHandler(handler)
    pydicom_logger.propagate = False
    deferred: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:  # a file that fails keeps its warnings too
                deferred = _sort_warnings(list(caught), notes)
    finally:
        pydicom_logger.removeHandler(handler)
        pydicom_logger.propagate = propagate
    for item in deferred:  # outside the recording block, so that they are not caught again
        warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)


def guarded(kind: str, what: str, call: Callable[[], T]) -> T:
    """``call()``, with any failure of a decoder as a :class:`DicomReadError`.

    Catches ``BaseException`` (a Rust decoder's ``PanicException`` derives from it, and a
    ``MemoryError`` is the file's fault here), except the ones that must stop the process.
    """
    try:
        return call()
    except DicomReadError:
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as err:  # noqa: BLE001 - see the docstring
        detail = " ".join(str(err).split())[:240]
        raise DicomReadError(kind, f"{what} ({type(err).__name__}: {detail})") from err


def _int(ds, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if isinstance(value, list | tuple) or value is None:
        raise DicomReadError("bad-values", f"{keyword} is missing or not one number: the "
                                           "header does not describe an image; export it again")
    try:
        number = int(value)
    except (TypeError, ValueError) as err:
        raise DicomReadError("bad-values", f"{keyword} = {str(value)[:40]!r} is not a whole "
                                           "number: export the file again") from err
    return number


@dataclass(frozen=True)
class Geometry:
    """The pixel layout a header declares (before anything is decoded)."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    frames: int

    @property
    def frame_bytes(self) -> int:
        """Bytes of one decoded frame (bit-packed 1-bit frames rounded up)."""
        return -(-self.rows * self.columns * self.samples * self.bits_allocated // 8)

    @property
    def total_bytes(self) -> int:
        return self.frame_bytes * self.frames


def geometry(ds, limits: ReadLimits) -> Geometry:
    """The header's pixel layout, refused when it is malformed or above ``limits``.

    Raises:
        DicomReadError: ``too-large`` above a bound, ``bad-values`` for nonsense values.
    """
    frames = _int(ds, "NumberOfFrames") if ds.get("NumberOfFrames") not in (None, "") else 1
    shape = Geometry(_int(ds, "Rows"), _int(ds, "Columns"), _int(ds, "SamplesPerPixel", 1),
                     _int(ds, "BitsAllocated"), frames or 1)
    if min(shape.rows, shape.columns, shape.samples, shape.frames) < 1:
        raise DicomReadError("bad-values", f"the header declares {shape.rows} x "
                             f"{shape.columns} pixels, {shape.samples} samples and "
                             f"{shape.frames} frames: not an image; export it again")
    if shape.bits_allocated not in (1, 8, 16, 32, 64):
        raise DicomReadError("bad-values", f"Bits Allocated = {shape.bits_allocated}: must be "
                                           "1, 8, 16, 32 or 64; export the file again")
    if shape.frame_bytes > limits.max_frame_bytes:
        raise DicomReadError(
            "too-large", f"one frame would decode to {shape.frame_bytes / MIB:,.0f} MiB "
            f"({shape.rows} x {shape.columns} pixels x {shape.samples} samples x "
            f"{shape.bits_allocated} bits), above max_frame_bytes "
            f"({limits.max_frame_bytes / MIB:,.0f} MiB): nothing was decoded. Raise the limit "
            "in the site data config only if the file is genuine")
    if shape.total_bytes > limits.max_pixel_bytes:
        raise DicomReadError(
            "too-large", f"{shape.frames} frames would decode to "
            f"{shape.total_bytes / MIB:,.0f} MiB, above max_pixel_bytes "
            f"({limits.max_pixel_bytes / MIB:,.0f} MiB): nothing was decoded. Raise the limit "
            "in the site data config only if the file is genuine")
    return shape


def inflate_bounded(path: Path, offset: int, limit: int) -> bytes:
    """The raw-deflate stream of ``path`` from ``offset`` on, inflated to at most ``limit``
    bytes (read and inflated in 1 MiB steps, so a bomb never expands past the limit).

    Raises:
        DicomReadError: ``too-large`` when it inflates past ``limit``; ``truncated`` or
            ``unreadable`` for a broken stream.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    with open(path, "rb") as handle:
        handle.seek(offset)
        while True:
            chunk = handle.read(MIB)
            if not chunk:
                break
            while chunk:
                try:
                    out += inflater.decompress(chunk, limit + 1 - len(out))
                except zlib.error as err:
                    raise DicomReadError("unreadable", f"the deflated dataset is damaged "
                                         f"({err}): export the file again") from err
                if len(out) > limit:
                    raise DicomReadError(
                        "too-large", f"the deflated dataset inflates to more than "
                        f"{limit / MIB:,.0f} MiB (a decompression bomb, or a file above "
                        "max_frame_bytes): nothing was decoded")
                chunk = inflater.unconsumed_tail
            if inflater.eof:
                break
    if not inflater.eof:
        raise DicomReadError("truncated", "the deflated dataset ends early: the file is "
                                          "truncated; export it again")
    return bytes(out)


def check_rle_frame(frame: bytes, shape: Geometry) -> None:
    """An RLE frame's header against the DICOM header: segment count and offsets.

    The RLE decoder trusts both and panics (a Rust ``PanicException``) on a mismatch.
    """
    if len(frame) < 64:
        raise DicomReadError("truncated", "an RLE frame is shorter than its 64-byte header: "
                                          "the file is truncated or damaged")
    header = struct.unpack("<16L", frame[:64])
    segments = header[0]
    expected = shape.samples * max(shape.bits_allocated // 8, 1)
    offsets = header[1:1 + segments] if 0 < segments <= 15 else ()
    if segments != expected or not offsets:
        raise DicomReadError(
            "bad-values", f"an RLE frame holds {segments} segments but the header "
                          f"({shape.samples} samples x {shape.bits_allocated} bits) needs "
                          f"{expected}: the file is damaged; export it again")
    if offsets[0] != 64 or any(b <= a for a, b in zip(offsets, offsets[1:], strict=False)) \
            or offsets[-1] >= len(frame):
        raise DicomReadError("bad-values", "an RLE frame's segment offsets are out of order "
                             "or past its end: the file is truncated or damaged")


def _j2k_size(frame: bytes) -> tuple[int, int, int] | None:
    offset = 0
    if frame.startswith(b"\x00\x00\x00\x0cjP  "):  # JP2 boxes around the codestream
        offset = 12
        while offset + 8 <= len(frame):
            length = int.from_bytes(frame[offset:offset + 4], "big")
            if frame[offset + 4:offset + 8] == b"jp2c":
                offset += 8
                break
            if length < 8:
                return None
            offset += length
    if frame[offset:offset + 4] != b"\xff\x4f\xff\x51" or len(frame) < offset + 42:
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">4L", frame[offset + 8:offset + 24])
    components = int.from_bytes(frame[offset + 40:offset + 42], "big")
    return ysiz - yosiz, xsiz - xosiz, components


def check_codestream(frame: bytes, syntax, shape: Geometry) -> None:
    """A JPEG-family frame's own size against the DICOM header, before it is decoded.

    JPEG decoders allocate what the codestream declares, not what the DICOM header says.
    Codestreams medfed cannot parse are left to the decoder.
    """
    from pydicom.pixels.utils import _get_jpg_parameters

    size = None
    if syntax.name.startswith(("JPEG 2000", "High-Throughput JPEG 2000")):
        size = _j2k_size(frame)
    elif syntax.name.startswith("JPEG"):
        info = _get_jpg_parameters(frame)
        if info:
            size = (info["height"], info["width"], info["components"])
    if size is None:
        return
    rows, columns, components = size
    if (rows, columns) != (shape.rows, shape.columns) or components > 4:
        raise DicomReadError(
            "bad-values", f"the compressed frame declares {rows} x {columns} pixels and "
                          f"{components} components but the header {shape.rows} x "
                          f"{shape.columns}: nothing was decoded; the file is damaged or forged")
