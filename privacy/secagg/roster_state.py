"""The newest consortium roster a hospital has accepted, kept in its site folder.

A roster is signed by the consortium CA with a serial (one more at each re-signing). Whoever
holds an older roster (the coordinator, anyone who saw one travel) could hand it back to a
hospital to make a revoked key count again; the signature alone cannot tell. So the hospital
keeps the serial (and digest) of the newest roster it has accepted in a small file of its own
(``roster-accepted.toml``, default) and refuses any roster with a lower serial, or a different
roster under the same serial (only a second signing by the CA key could make one).

The file is written to a temporary file, fsynced, renamed over the old one and the folder
fsynced (a crash leaves the old or the new record, never half of one); a lock file serialises
the ClientApp processes that may check rosters at once. Deleting the file forgets the newest
serial: that is the hospital's own staff (out of scope, docs/threat-model.md).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import tomli_w

from privacy.secagg.config import SecAggError

if TYPE_CHECKING:
    from privacy.secagg.identity import Roster

logger = logging.getLogger(__name__)

ROSTER_STATE_FILE = "roster-accepted.toml"
"""In the site folder: the newest roster serial this hospital accepted."""


@dataclass(frozen=True)
class AcceptedRoster:
    """What the hospital remembers of the newest roster it accepted.

    Attributes:
        serial: its serial (0: none accepted yet).
        digest: SHA-256 (hex) of its signed body.
        consortium: the consortium that signed it.
        expires_at: its expiry (ISO 8601).
        accepted_at: when this hospital first accepted it (ISO 8601 UTC).
    """

    serial: int = 0
    digest: str = ""
    consortium: str = ""
    expires_at: str = ""
    accepted_at: str = ""


def read_accepted(path: Path) -> AcceptedRoster:
    """The record in ``path`` (no file: nothing accepted yet, serial 0).

    Raises:
        SecAggError: the file exists but cannot be read, or holds unknown or ill-typed keys.
    """
    path = Path(path)
    if not path.exists():
        return AcceptedRoster()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise SecAggError(f"roster state {path}: cannot read it ({err}); restore it from a "
                          "backup (deleting it forgets which roster is the newest)") from err
    known = set(AcceptedRoster.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise SecAggError(f"roster state {path}: unknown keys {unknown}; allowed: {sorted(known)}")
    serial = data.get("serial", 0)
    if isinstance(serial, bool) or not isinstance(serial, int) or serial < 0:
        raise SecAggError(f"roster state {path}: serial = {serial!r}: must be an integer >= 0")
    if not all(isinstance(data.get(k, ""), str) for k in known - {"serial"}):
        raise SecAggError(f"roster state {path}: every key but serial must be a string")
    return AcceptedRoster(**data)


def _write_durably(path: Path, record: AcceptedRoster) -> None:
    """Write ``record`` to ``path`` atomically (temporary file, fsync, rename, folder fsync)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write("# The newest consortium roster this hospital accepted (medfed). Older\n"
                     "# rosters are refused. Written by the hospital; do not edit.\n")
        handle.write(tomli_w.dumps(asdict(record)))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``'s lock file (one ClientApp process at a time)."""
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def accept_roster(path: Path, roster: Roster, where: str) -> AcceptedRoster:
    """Accept ``roster`` (already verified against the CA and unexpired) if it is not older
    than the newest this hospital accepted; record it when it is newer.

    Args:
        path: the hospital's roster state file.
        roster: the roster to accept.
        where: how errors name the roster (its file).

    Returns:
        The record after the check (the roster's own when it was newer).

    Raises:
        SecAggError: its serial is below the accepted one (a replayed or stale roster), or
            another roster was accepted under the same serial.
    """
    path = Path(path)
    with _locked(path):
        newest = read_accepted(path)
        if roster.serial < newest.serial:
            moved = (f" (this roster is consortium '{roster.consortium}', the accepted one "
                     f"'{newest.consortium}': if this hospital joined another consortium, move "
                     f"{path.name} away)" if roster.consortium != newest.consortium else "")
            raise SecAggError(
                f"{where}: serial {roster.serial} is older than serial {newest.serial}, which "
                f"this hospital accepted at {newest.accepted_at} ({path}); an older roster may "
                f"still list revoked keys and is refused: copy the current roster.toml from "
                f"the coordinator{moved}")
        if roster.serial == newest.serial:
            if roster.digest != newest.digest:
                raise SecAggError(
                    f"{where}: a different roster under serial {roster.serial} than the one "
                    f"this hospital accepted ({path}); the CA signed two rosters with one "
                    f"serial: ask the coordinator to re-sign ('medfed coordinator sign-roster')")
            return newest
        record = AcceptedRoster(roster.serial, roster.digest, roster.consortium,
                                roster.expires_at,
                                dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        _write_durably(path, record)
        logger.info("accepted consortium roster serial %d (was %d), expires %s", roster.serial,
                    newest.serial, roster.expires_at)
        return record
