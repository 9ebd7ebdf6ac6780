"""One typed reader for every medfed settings file: study, simulation, hospital, policies.

A settings class is a dataclass whose fields carry their type (``int``, ``float``, ``str``,
``bool``, ``list[str]``, ``tuple[str, ...]``, a nested settings dataclass) and, where a value
has limits, the limits in the field's metadata (see :func:`setting`); its help text is the
``Attributes:`` section of its docstring. :func:`load_settings` turns a TOML table into an
instance and refuses, when the file is read, an unknown key, a value of the wrong type and a
value out of range, naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from core.errors import MedfedError

T = TypeVar("T")

_LIMITS = ("choices", "items", "ge", "gt", "le", "lt")


class SettingsError(MedfedError, ValueError):
    """A settings file or value that cannot be used; the message names the file and key."""


def setting(default: Any = MISSING, *, default_factory: Any = MISSING,
            choices: tuple[Any, ...] | None = None, items: tuple[Any, ...] | None = None,
            ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A dataclass field with limits the reader checks.

    Args:
        default, default_factory: as for :func:`dataclasses.field`.
        choices: the values allowed.
        items: the values each item of a list setting may take.
        ge, gt, le, lt: bounds on a number (``>=``, ``>``, ``<=``, ``<``); on a list of
            numbers, bounds on each item.
    """
    limits = {name: value for name, value in (("choices", choices), ("items", items),
                                              ("ge", ge), ("gt", gt), ("le", le), ("lt", lt))
              if value is not None}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=limits)
    return dataclasses.field(default=default, metadata=limits)


def allowed(f: dataclasses.Field) -> str:
    """What a field allows, in words (``"one of 'iid', 'dirichlet'"``, ``">= 1"``); "" if any."""
    meta = f.metadata
    parts = []
    if "choices" in meta:
        parts.append("one of " + ", ".join(repr(c) for c in meta["choices"]))
    if "items" in meta:
        parts.append("items from " + ", ".join(repr(c) for c in meta["items"]))
    each = "each " if _is_list(f) else ""
    for key, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in meta:
            parts.append(f"{each}{sign} {meta[key]:g}")
    return ", ".join(parts)


def _is_list(f: dataclasses.Field) -> bool:
    """Whether a field holds a list (its annotation is a string under postponed evaluation)."""
    hint = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    return hint.startswith(("list", "tuple"))


def type_name(hint: Any) -> str:
    """A type as the reference shows it: ``int``, ``list of str``, ``table``."""
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        return f"list of {type_name(typing.get_args(hint)[0])}"
    if is_dataclass(hint):
        return "table"
    return getattr(hint, "__name__", str(hint))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_type(hint: Any, value: Any, where: str) -> Any:
    """``value`` as ``hint`` (ints accepted for floats, lists for tuples), or raise."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _check_type(options[0], value, where)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise SettingsError(f"{where} = {value!r}: expected a list of "
                                f"{type_name(typing.get_args(hint)[0])}")
        item = typing.get_args(hint)[0]
        checked = [_check_type(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(checked) if origin is tuple else checked
    if hint is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{where} = {value!r}: expected true or false")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SettingsError(f"{where} = {value!r}: expected a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{where} = {value!r}: expected a whole number")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise SettingsError(f"{where} = {value!r}: expected a string")
        return value
    return value


def _check_limits(f: dataclasses.Field, value: Any, where: str) -> None:
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise SettingsError(_refusal(where, value, allowed(f), meta["choices"]))
    if "items" in meta:
        for item in value:
            if item not in meta["items"]:
                what = "one of " + ", ".join(repr(c) for c in meta["items"])
                raise SettingsError(_refusal(f"{where} item", item, what, meta["items"]))
    for key, ok in (("ge", lambda v, b: v >= b), ("gt", lambda v, b: v > b),
                    ("le", lambda v, b: v <= b), ("lt", lambda v, b: v < b)):
        items = value if isinstance(value, list | tuple) else [value]
        if key in meta and not all(ok(item, meta[key]) for item in items):
            raise SettingsError(f"{where} = {value!r}: must be {allowed(f)}")


def _refusal(where: str, value: Any, what: str, options: tuple[Any, ...]) -> str:
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where} = {value!r}: must be {what}{hint}"


def load_settings(cls: type[T], values: Mapping[str, Any], where: str,
                  base: T | None = None, prefix: str = "") -> T:
    """``base`` (default: ``cls()``'s defaults) with ``values`` applied and checked.

    Keys may use dashes or underscores; nested settings take a table. Messages read
    ``"<where>: <prefix><key> = <value>: must be ..."``.

    Raises:
        SettingsError: an unknown key, a wrong type, a value out of range, or a value the
            settings class itself refuses; the message starts with ``where`` and the key.
    """
    if not isinstance(values, Mapping):
        raise SettingsError(f"{where}: {prefix.rstrip('.') or 'the file'} must be a table of "
                            f"settings, got {values!r}")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    hints = _hints(cls)
    changes: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        at = f"{where}: {prefix}{key}"
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SettingsError(f"{at}: unknown setting{hint}; known: {sorted(known)}")
        hint = hints[name]
        if is_dataclass(hint):
            inner = getattr(base, name) if base is not None else None
            changes[name] = load_settings(hint, value, where, inner, f"{prefix}{key}.")
            continue
        checked = _check_type(hint, value, at)
        _check_limits(known[name], checked, at)
        changes[name] = checked
    try:
        if base is not None:
            return replace(base, **changes)  # type: ignore[type-var]
        return cls(**changes)
    except (ValueError, TypeError) as err:
        if isinstance(err, SettingsError):
            raise
        raise SettingsError(f"{where}: {prefix}{err}" if not prefix else
                            f"{where}: [{prefix.rstrip('.')}] {err}") from err


def check_settings(obj: Any, where: str = "") -> None:
    """Check every field of ``obj`` (and nested settings) against its limits.

    For settings built in code (``dataclasses.replace``) rather than read from a file.

    Raises:
        SettingsError: as :func:`load_settings`.
    """
    hints = _hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        at = f"{where}.{f.name}" if where else f.name
        if is_dataclass(hints[f.name]):
            check_settings(value, at)
            continue
        _check_limits(f, _check_type(hints[f.name], value, at), at)


def read_toml(path: Path, label: str = "", unreadable_hint: str = "",
              error: type[Exception] = SettingsError,
              unreadable_error: type[Exception] | None = None) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict; ``error`` names ``label`` (default: the path)."""
    label = label or str(path)
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise (unreadable_error or error)(
            f"{label}: cannot read it ({err}){unreadable_hint}") from err
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise error(f"{label}: not valid TOML ({err})") from err


def read_settings(
    path: Path,
    cls: type,
    error: type[Exception],
    label: str,
    table: str | None = None,
    unreadable_hint: str = "",
    unreadable_error: type[Exception] | None = None,
) -> dict[str, Any]:
    """The values of ``[table]`` (or the whole file) in ``path``, checked against ``cls``:
    unknown keys, wrong types and values out of the fields' limits raise ``error``.

    Args:
        path: the TOML file.
        cls: the settings dataclass.
        error: exception raised for invalid TOML or a refused setting.
        label: how messages name the file, e.g. ``"run policy /etc/x.toml"``.
        table: read this table only (``[hospital]``); None reads the top level.
        unreadable_hint: appended to the message when the file cannot be read.
        unreadable_error: exception for an unreadable file (default ``error``).

    Returns:
        The values as written (keys as in the file), to build ``cls`` from.
    """
    values = read_toml(path, label, unreadable_hint, error, unreadable_error)
    if table is not None:
        values = values.get(table, {})
    where = f"{label} [{table}]" if table else label
    known = {f.name for f in fields(cls)}
    try:
        _check_values(cls, {k: v for k, v in values.items() if k in known}, where)
    except SettingsError as err:
        raise error(str(err)) from err
    unknown = sorted(set(values) - known)
    if unknown:
        where = f" in [{table}]" if table else ""
        raise error(f"{label}: unknown settings {unknown}{where}; known: {sorted(known)}")
    return values


def _check_values(cls: type, values: Mapping[str, Any], where: str) -> None:
    """Types and limits of ``values`` (known keys only), without building ``cls``."""
    known = {f.name: f for f in fields(cls)}
    hints = _hints(cls)
    for key, value in values.items():
        at = f"{where}: {key}"
        if is_dataclass(hints[key]):
            if not isinstance(value, Mapping):
                raise SettingsError(f"{at}: expected a table")
            continue
        _check_limits(known[key], _check_type(hints[key], value, at), at)


def field_help(cls: type) -> dict[str, str]:
    """Each field's help: its entry in the ``Attributes:`` section of ``cls``'s docstring.

    An entry ``a, b: text`` documents both fields.
    """
    doc = inspect.getdoc(cls) or ""
    match = re.search(r"^Attributes:\n(.*?)(?:^\S|\Z)", doc, re.S | re.M)
    if not match:
        return {}
    help_of: dict[str, str] = {}
    current: list[str] = []
    for line in match.group(1).splitlines():
        # "    name: text" or "    a, b: text"; a continuation line is indented deeper.
        entry = re.match(r"^    (\w+(?:, \w+)*):\s*(.*)$", line)
        if entry:
            current = [n.strip() for n in entry.group(1).split(",")]
            for name in current:
                help_of[name] = entry.group(2).strip()
        elif line.strip() and current:
            for name in current:
                help_of[name] += " " + line.strip()
    return help_of


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING
