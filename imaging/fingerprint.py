"""The dataset fingerprint: one hash that says exactly which data trained a model.

sha256 over the class list, the frames setting (which frames of a multi-frame file or series
become images) and, for every usable manifest row in a fixed order, its path as written, label,
patient id, split and the sha256 of its file bytes. The fingerprint may leave the
hospital; the inputs never do.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def dataset_fingerprint(classes: Iterable[str],
                        rows: Iterable[tuple[str, int, str, str, str]],
                        frames: str = "middle") -> str:
    """``sha256:<hex>`` of the class list, the frames setting and ``(path, label, patient,
    split, content_sha256)`` rows; independent of row order in the manifest."""
    digest = hashlib.sha256()
    digest.update(("classes\t" + "\t".join(classes) + "\n").encode())
    digest.update(f"frames\t{frames}\n".encode())
    for row in sorted(rows):
        digest.update(("\t".join(str(v) for v in row) + "\n").encode())
    return "sha256:" + digest.hexdigest()
