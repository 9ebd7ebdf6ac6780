"""How a manifest and its files become images: the settings every reader of a manifest shares.

A hospital's site data settings (``client.data.config.SiteDataConfig``) extend these with what
only a hospital needs (the split, the decoded-image cache, the error budget); a coordinator
that holds an evaluation set reads its manifest with these alone (``server.evaluation``).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path

from core.errors import MedfedError
from core.settings import setting
from imaging.guard import ReadLimits

FRAME_MODES = ("middle", "all", "volume")
MAX_INDEX_CLASSES = 1000
"""Without a class list, integer labels must be below this (declare ``classes`` to be exact)."""


class ReadSettingsError(MedfedError, ValueError):
    """A reader setting that cannot work (a repeated class, an unknown encoding)."""


@dataclass(frozen=True)
class ReadSettings:
    """Which manifest columns mean what, the class list, and how files are decoded.

    Attributes:
        classes: class names in label order; a label is a name (matched exactly, then
            ignoring case) or an index into this list. Empty: labels must be integer class
            indices.
        path_column: manifest column with the DICOM file or series folder, relative to the
            manifest's folder (absolute paths are taken as they are); it must lie, after
            resolving symbolic links, inside one of ``allowed_roots``.
        label_column: manifest column with the class name or index.
        patient_column: manifest column with the patient id.
        split_column: optional manifest column with ``train`` or ``val``.
        frames: multi-frame files and series folders give their ``middle`` frame or ``all``
            frames (one image each); ``volume``: each row is one CT volume (a series folder or
            a NIfTI file) for a 3D backbone (``imaging.volumes``).
        allowed_roots: folders the manifest's paths may point into (after resolving symbolic
            links); relative ones are taken from the manifest's folder. Empty: the manifest's
            folder only.
        max_frame_bytes: most bytes one frame may decode to, as its header declares it
            (Rows x Columns x Samples per Pixel x Bits Allocated / 8). Frames are decoded one
            at a time, so this bounds the memory one row needs; a deflated file may inflate to
            at most this plus 1 MiB. Checked before anything is decoded.
        max_pixel_bytes: most bytes all the frames of one file may decode to, as its header
            declares them (one frame's bytes x Number of Frames). Checked before decoding.
        manifest_encoding: text encoding of the manifest (``utf-8`` also reads a byte-order
            mark; ``cp1252`` or ``latin-1`` for some spreadsheet exports).
    """

    classes: tuple[str, ...] = ()
    path_column: str = "path"
    label_column: str = "label"
    patient_column: str = "patient_id"
    split_column: str = "split"
    frames: str = setting("middle", choices=FRAME_MODES)
    allowed_roots: tuple[str, ...] = ()
    max_frame_bytes: int = setting(64 * 2**20, ge=1)
    max_pixel_bytes: int = setting(2**30, ge=1)
    manifest_encoding: str = "utf-8"

    def __post_init__(self) -> None:
        if len({c.casefold() for c in self.classes}) != len(self.classes):
            raise ReadSettingsError(f"classes {list(self.classes)} repeat a name (names "
                                    "match ignoring case)")
        if len(self.classes) > MAX_INDEX_CLASSES:
            raise ReadSettingsError(
                f"{len(self.classes)} classes: at most {MAX_INDEX_CLASSES} are supported")
        try:
            codecs.lookup(self.manifest_encoding)
        except LookupError as err:
            raise ReadSettingsError(f"manifest_encoding = {self.manifest_encoding!r} is not "
                                    "a known encoding (e.g. 'utf-8', 'cp1252')") from err

    @property
    def limits(self) -> ReadLimits:
        """The header bounds checked before anything is decoded."""
        return ReadLimits(self.max_frame_bytes, self.max_pixel_bytes)

    def resolved_roots(self, manifest: Path) -> tuple[Path, ...]:
        """The folders manifest paths may point into, absolute and with links resolved."""
        folder = Path(manifest).resolve().parent
        roots = self.allowed_roots or (".",)
        return tuple((folder / Path(r).expanduser()).resolve() for r in roots)
