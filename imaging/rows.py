"""One manifest row -> the model's input images, and rows -> one labelled image set.

:func:`read_row` is the one path from a row's file (or series folder, or volume) to
``(F, C, S, S)`` float32 images in [0, 1]: the path confined, the bytes hashed, the file decoded
one frame at a time under the header bounds, transformed, every failure a
:class:`~imaging.guard.DicomReadError` naming the row's problem. A caller may pass a
:class:`RowCache` (the hospital's decoded-image cache) keyed by the file's content hash and the
transform settings. Every warning reading a row gives (pydicom's above all) is captured into
that row's notes (:attr:`DecodedRow.notes`, or the error's reason), never printed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from imaging.dicom import DecodedImage, DicomReadError, iter_decoded
from imaging.guard import Notes, captured, guarded
from imaging.manifest import Entry
from imaging.paths import OutsideRootError, series_files
from imaging.settings import ReadSettings
from imaging.transforms import to_model_input, transform_settings
from imaging.volumes import volume_model_input
from models.data import ImageSet
from models.volume_transforms import volume_settings


def file_sha256(path: Path, series: list[Path] | None = None) -> str:
    """sha256 of a file's bytes, or of a series folder's file names and bytes (hex).

    ``series``: the folder's files as the caller listed (and confined) them; default: every
    file in the folder not starting with a dot.
    """
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        files = series if series is not None else [
            p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
        for child in sorted(files, key=lambda p: p.name):
            digest.update(child.name.encode() + b"\0" + file_sha256(child).encode())
        return digest.hexdigest()
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def cache_key(content_sha256: str, settings: dict[str, object]) -> str:
    """Entry name for a file's content hash under the given transform settings."""
    blob = content_sha256 + json.dumps(settings, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class RowCache(Protocol):
    """Decoded images stored by key (``client.data.cache.DecodedCache``)."""

    def get(self, key: str) -> tuple[np.ndarray, list[str], list[str], list[str]] | None: ...

    def put(self, key: str, image: np.ndarray, uids: list[str],
            patients: list[str] | None = None, notes: list[str] | None = None) -> None: ...


@dataclass
class DecodedRow:
    """A manifest row read.

    Attributes:
        entry: the row.
        image: ``(F, C, S, S)`` float32 in [0, 1] (one entry per kept frame), or
            ``(1, 1, D, H, W)`` for a volume.
        content_sha256: sha256 of the row's file bytes (a series: names and bytes).
        file_patients: the Patient ID of each file read.
        uids: the SOP Instance UIDs of the files read (empty ones left out).
        cached: the cache served the images.
        notes: the warnings reading the row gave (pydicom's, say, about a malformed value), for
            the check's report; the row is usable all the same.
    """

    entry: Entry
    image: np.ndarray
    content_sha256: str
    file_patients: list[str]
    uids: list[str]
    cached: bool = False
    notes: list[str] = field(default_factory=list)


def _decode(entry: Entry, settings: ReadSettings, image_size: int, cache: RowCache | None,
            roots: tuple[Path, ...]) -> tuple[DecodedRow, str]:
    """The row's images (from ``cache`` when it holds them) and their cache key."""
    if not entry.path.exists():
        raise DicomReadError("missing", "file not found: fix the path (relative to the "
                                        "manifest's folder) or remove the row")
    series = None
    try:
        if entry.path.is_dir():
            series = series_files(entry.path, roots)
        content = file_sha256(entry.path, series)
    except OutsideRootError as err:
        raise DicomReadError("outside", str(err)) from err
    except OSError as err:
        raise DicomReadError("unreadable", f"cannot read the file ({err})") from err
    volume = settings.frames == "volume"  # one CT volume per row (imaging.volumes)
    transform = (volume_settings(image_size, None) if volume
                 else transform_settings(image_size, settings.frames))
    key = cache_key(content, transform)
    if cache is not None and (hit := cache.get(key)) is not None:
        return DecodedRow(entry, hit[0], content, hit[2], hit[1], cached=True,
                          notes=hit[3]), key
    if volume:
        image = volume_model_input(entry.path, image_size, series)
        return DecodedRow(entry, image, content, [], []), key
    images, uids, patients, shapes = [], [], [], set()
    for file in iter_decoded(entry.path, settings.frames, settings.limits, series,
                             shrink_to=image_size):
        for frame in file.frames:
            shapes.add(frame.values.shape)
            if len(shapes) > 1:
                raise DicomReadError("bad-values", f"series images differ in size "
                                     f"{sorted(shapes)}: one series folder must hold one series")
            single = DecodedImage(frame.values[None], frame.invert, frame.rgb_max, [],
                                  frame.value_range)
            images.append(to_model_input(single, image_size))
        uids.append(file.sop_uid)
        patients.append(file.patient_id)
    if not images:
        raise DicomReadError("no-pixels", "no frames to read: remove the row")
    image = np.concatenate(images)
    uids = [u for u in uids if u]
    return DecodedRow(entry, image, content, patients, uids), key


def read_row(entry: Entry, settings: ReadSettings, image_size: int, roots: tuple[Path, ...],
             cache: RowCache | None = None) -> DecodedRow:
    """The images of one manifest row.

    Args:
        entry: a row :func:`imaging.manifest.read_manifest` accepted.
        settings: frames and header bounds.
        image_size: side in pixels of the images the model takes.
        roots: the allowed folders (``settings.resolved_roots(manifest)``).
        cache: decoded images by content hash and transform settings; None: decode.

    Raises:
        DicomReadError: whatever makes the row unusable (its ``kind`` and ``reason``). Any
            failure of a decoder or transform (Rust panics, MemoryError included) costs the
            row, never the caller.
    """
    notes = Notes()
    try:
        with captured(notes):
            row, key = guarded("unreadable", "the file cannot be read; it is damaged or "
                               "unsupported", lambda: _decode(entry, settings, image_size, cache,
                                                              roots))
    except DicomReadError as err:
        unsaid = [line for line in notes.lines if line not in err.reason]
        if unsaid:
            err.reason += f" [pydicom: {'; '.join(unsaid[:2])}]"
        raise
    if not row.cached:
        row.notes = notes.lines
        if cache is not None:
            cache.put(key, row.image, row.uids, row.file_patients, row.notes)
    return row


def stack_images(images: list[np.ndarray], labels: list[int], image_size: int) -> ImageSet:
    """One :class:`ImageSet` of rows' images (each ``(F, C, S, S)``), every frame labelled with
    its row's label; grayscale rows get 3 equal channels when colour rows are present."""
    if not images:
        return ImageSet(torch.zeros(0, 1, image_size, image_size), torch.zeros(0, dtype=torch.long))
    channels = max(image.shape[1] for image in images)
    arrays = [np.repeat(a, channels, axis=1) if a.shape[1] != channels else a for a in images]
    frames = [len(a) for a in arrays]
    return ImageSet(torch.from_numpy(np.concatenate(arrays)),
                    torch.tensor(np.repeat(labels, frames), dtype=torch.long))
