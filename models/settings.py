"""Reading a typed settings table from a TOML file, with errors that name the file and key.

Hospital, coordinator and policy files all need the same three checks: the file can be read, it
is valid TOML, and it names no setting the dataclass does not know.
"""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any


def read_settings(
    path: Path,
    cls: type,
    error: type[Exception],
    label: str,
    table: str | None = None,
    unreadable_hint: str = "",
    unreadable_error: type[Exception] | None = None,
) -> dict[str, Any]:
    """The values of ``[table]`` (or the whole file) in ``path``, checked against ``cls``.

    Args:
        path: the TOML file.
        cls: the dataclass whose field names are the known settings.
        error: exception raised for invalid TOML or unknown settings.
        label: how messages name the file, e.g. ``"run policy /etc/x.toml"``.
        table: read this table only (``[hospital]``); None reads the top level.
        unreadable_hint: appended to the message when the file cannot be read.
        unreadable_error: exception for an unreadable file (default ``error``).
    """
    try:
        values = tomllib.loads(Path(path).read_text())
    except OSError as err:
        raise (unreadable_error or error)(
            f"{label}: cannot read it ({err}){unreadable_hint}") from err
    except tomllib.TOMLDecodeError as err:
        raise error(f"{label}: not valid TOML ({err})") from err
    if table is not None:
        values = values.get(table, {})
    known = sorted(f.name for f in fields(cls))
    unknown = sorted(set(values) - set(known))
    if unknown:
        where = f" in [{table}]" if table else ""
        raise error(f"{label}: unknown settings {unknown}{where}; known: {known}")
    return values
