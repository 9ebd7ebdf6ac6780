"""What can be wrong with a manifest's rows, one at a time, and a manifest that cannot be read."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("outside", "missing", "not-dicom", "truncated", "unreadable", "too-large",
         "unsupported", "not-image", "no-pixels", "bad-values", "duplicate", "patient", "label",
         "row")
"""Problem kinds, in the order the report lists them."""


@dataclass(frozen=True)
class Problem:
    """One manifest row that cannot be used, and why.

    Attributes:
        row: line number in the manifest file (the header is line 1).
        path: the row's path as written in the manifest.
        kind: one of :data:`KINDS`.
        reason: what is wrong and what to do, in words.
    """

    row: int
    path: str
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row} ({self.path}): {self.reason}"


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (missing, empty, lacking a column)."""

