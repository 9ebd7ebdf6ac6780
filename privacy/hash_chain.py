"""A hash chain of records and its anchor, as the privacy ledger and the egress audit log keep
them: each record stores the hash of the one before it (:data:`GENESIS` for the first) and a
hash of its own content; an anchor file beside it records how many records there were and the
last one's hash, so records cut off the end (or a chain rebuilt from an edit on) show too.

The caller reads its own records (SQLite rows, JSON lines) into :class:`Link` s; this module
walks them and compares the anchor, and writes anchors atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

GENESIS = "0" * 64
"""The "previous hash" of a chain's first record (sha256 hex length)."""


@dataclass(frozen=True)
class Link:
    """One record as the chain sees it.

    Attributes:
        prev: the previous record's hash, as this record stores it.
        digest: this record's hash, which the next record must store as its ``prev``.
        intact: whether the record's content matches the hash it stores of itself.
    """

    prev: str
    digest: str
    intact: bool


@dataclass(frozen=True)
class ChainWalk:
    """What :func:`walk` found.

    Attributes:
        records: records read (up to and including a broken one).
        hashes: :data:`GENESIS`, then each intact record's ``digest`` in order (``hashes[n]``
            is the hash the chain had after ``n`` records: what an anchor of ``n`` records
            must hold).
        broken: the first broken record, 1-based; 0 when the whole chain holds.
        edited: the broken record fails its own hash (else it does not chain to the one before
            it: records before it were removed, or the one before was rewritten).
    """

    records: int
    hashes: list[str] = field(default_factory=lambda: [GENESIS])
    broken: int = 0
    edited: bool = False


def walk(links: Iterable[Link]) -> ChainWalk:
    """Follow ``links`` from the first; stop at the first record that breaks the chain."""
    prev, hashes, number = GENESIS, [GENESIS], 0
    for number, link in enumerate(links, start=1):
        if not link.intact or link.prev != prev:
            return ChainWalk(number, hashes, broken=number, edited=not link.intact)
        prev = link.digest
        hashes.append(prev)
    return ChainWalk(number, hashes)


def anchor_mismatch(chain: ChainWalk, anchored: int, head: str) -> str:
    """Why an anchor recording ``anchored`` records ending in hash ``head`` does not fit the
    walked ``chain``: ``"cut"`` (it records more records than there are), ``"differs"`` (the
    chain's hash after ``anchored`` records is another), or ``""`` (it fits; more records than
    anchored also fit: a crash between writing a record and its anchor)."""
    if anchored > len(chain.hashes) - 1:
        return "cut"
    return "differs" if chain.hashes[anchored] != head else ""


def write_anchor(path: Path, values: dict[str, int | str]) -> None:
    """Replace the anchor at ``path`` with ``values`` as JSON, atomically (a 0600 temporary,
    fsync, rename): a crash leaves the old anchor or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(values, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
