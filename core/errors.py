"""The one base of every error medfed raises on purpose.

A :class:`MedfedError` is a refusal the user can act on: a file, setting, message or state
that medfed will not use, with a message that names it (the file, the key, the value) and what
to do. The command line prints one as a single ``error:`` line (its traceback with
``--verbose``); any other exception is a bug and keeps its traceback. Each room's errors
derive from this base and, where callers already catch them so, from ``ValueError`` or
``RuntimeError`` too.
"""

from __future__ import annotations

__all__ = ["MedfedError"]


class MedfedError(Exception):
    """A refusal with a message that names what was refused and what to do about it."""
