"""Decoded, resized images on disk, so that round 2 does not decode DICOM again.

An entry is keyed by the sha256 of the file's bytes and the transform settings: a changed file
or a changed image size is a miss, never a stale hit. Entries are written to a temporary file
and renamed (atomic on POSIX), so a crash leaves no half-written entry; an entry that cannot be
read back or fails its checks is deleted and the image decoded again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from imaging.rows import cache_key, file_sha256

__all__ = ["DecodedCache", "cache_key", "file_sha256"]

logger = logging.getLogger(__name__)

class DecodedCache:
    """Folder of ``<key[:2]>/<key>.npz`` entries: ``image`` (F, C, S, S) float32 and ``ids``, one
    JSON string with the SOP Instance UIDs, the files' Patient IDs (so a cache hit can still be
    checked against the manifest) and the warnings decoding gave (so a hit reports them too;
    one array, so a hit reads two members, not three)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def get(self, key: str) -> tuple[np.ndarray, list[str], list[str], list[str]] | None:
        """The stored image, SOP Instance UIDs, Patient IDs and decoding warnings, or None
        (missing, or corrupt and deleted)."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as entry:
                image, ids = entry["image"], json.loads(str(entry["ids"]))
                uids, patients = [str(u) for u in ids["uids"]], [str(p) for p in ids["patients"]]
                notes = [str(n) for n in ids.get("notes", [])]
            if (image.dtype != np.float32 or image.ndim not in (4, 5)
                    or not np.isfinite(image).all()
                    or image.min() < 0.0 or image.max() > 1.0):
                raise ValueError(f"unexpected content {image.dtype}{list(image.shape)}")
            return image, uids, patients, notes
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
            logger.warning("cache entry %s is corrupt (%s): deleted, decoding again", path, err)
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, image: np.ndarray, uids: list[str],
            patients: list[str] | None = None, notes: list[str] | None = None) -> None:
        """Store an entry atomically; a full or read-only disk only costs a warning."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as handle:
                    np.savez(handle, image=image.astype(np.float32, copy=False),
                             ids=np.array(json.dumps({"uids": uids,
                                                      "patients": patients or [],
                                                      "notes": notes or []})))
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as err:
            logger.warning("cannot write cache entry %s (%s): continuing without it", path, err)
