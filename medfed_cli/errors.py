"""How an error reaches the user: the one table of the exceptions that are the user's.

An exception whose class is in :data:`USER_ERRORS` (every :class:`~core.errors.MedfedError`,
a missing or existing file, a daemon that did not answer in time) is printed as one red
``error:`` line and the command exits with its code; with ``medfed --verbose`` its traceback
comes first. Any other exception is a bug in medfed: it is raised on, traceback and all, so
that a bug is never hidden behind a one-line message.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import traceback
from collections.abc import Callable

from rich.markup import escape

from core.errors import MedfedError
from medfed_cli.common import console

Command = Callable[[argparse.Namespace], int]


def _file_message(err: OSError) -> str:
    """``"<file>: <reason>"``, as ``open`` would name it, without Python's ``[Errno n]``."""
    reason = err.strerror or str(err)
    return f"{err.filename}: {reason}" if err.filename is not None else reason


def _timeout_message(err: subprocess.TimeoutExpired) -> str:
    command = err.cmd if isinstance(err.cmd, str) else shlex.join(map(str, err.cmd))
    return f"{command} did not answer within {err.timeout:g} s; is it running?"


USER_ERRORS: tuple[tuple[type[BaseException], Callable], ...] = (
    (MedfedError, str),
    (FileNotFoundError, _file_message),
    (FileExistsError, _file_message),
    (PermissionError, _file_message),
    (IsADirectoryError, _file_message),
    (NotADirectoryError, _file_message),
    (subprocess.TimeoutExpired, _timeout_message),
)
"""(exception class, its one-line message) for the user's errors, first match wins."""

ERROR_EXIT_CODE = 1
"""A command's exit status after a user's error, unless it declares its own
(:func:`exit_code_on_error`)."""


def exit_code_on_error(code: int) -> Callable[[Command], Command]:
    """Declare a command's exit status after a user's error, e.g. 2 where 1 already means
    a negative answer (``medfed hospital check``: 1 = not ready, 2 = the check could not run)."""

    def declare(command: Command) -> Command:
        command.error_exit_code = code  # type: ignore[attr-defined]
        return command

    return declare


def user_message(err: BaseException) -> str | None:
    """The one line shown for a user's error; None for anything else (a bug)."""
    for cls, message in USER_ERRORS:
        if isinstance(err, cls):
            return message(err)
    return None


def run_command(command: Command, args: argparse.Namespace) -> int:
    """``command(args)``, with a user's error printed as one line (its traceback first when
    ``args.verbose``) and returned as the command's error exit status; other exceptions
    propagate."""
    try:
        return command(args)
    except Exception as err:
        message = user_message(err)
        if message is None:
            raise
        if getattr(args, "verbose", False):
            traceback.print_exc(file=sys.stderr)
        console.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
        return getattr(command, "error_exit_code", ERROR_EXIT_CODE)
