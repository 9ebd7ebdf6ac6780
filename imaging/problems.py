"""What can be wrong with a manifest's rows, one at a time, and a manifest that cannot be read.

:func:`summarise` lists problems grouped by kind, the first few of each kind in full and a
count of the rest, so that 100,000 bad rows make a readable report (the full list goes to a
report file).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from core.errors import MedfedError

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


class ManifestError(MedfedError, ValueError):
    """The manifest as a whole cannot be used (missing, empty, lacking a column)."""



SHOWN_PER_KIND = 20
"""Problems of one kind a summary lists in full (the rest are counted)."""


def summarise(problems: Sequence[Problem], per_kind: int | None = SHOWN_PER_KIND,
              indent: str = "  ") -> tuple[list[str], int]:
    """Lines listing ``problems`` grouped by kind (in :data:`KINDS` order, other kinds after).

    Each kind gets a heading with its count, then its first ``per_kind`` problems in full
    (all of them when ``per_kind`` is None), then ``... and K more rows with <kind> problems``
    for the rest, naming their first and last rows.

    Returns:
        the lines, and how many problems they leave out.
    """
    groups: dict[str, list[Problem]] = {}
    for problem in problems:
        groups.setdefault(problem.kind, []).append(problem)
    order = [k for k in KINDS if k in groups] + sorted(k for k in groups if k not in KINDS)
    lines: list[str] = []
    hidden = 0
    for kind in order:
        of_kind = groups[kind]
        shown = of_kind if per_kind is None else of_kind[:per_kind]
        lines.append(f"{indent}{kind} ({len(of_kind)}):")
        lines += [f"{indent}  {p}" for p in shown]
        rest = of_kind[len(shown):]
        if rest:
            hidden += len(rest)
            lines.append(f"{indent}  ... and {len(rest):,} more rows with {kind!r} problems "
                         f"(rows {rest[0].row} to {rest[-1].row})")
    return lines, hidden
