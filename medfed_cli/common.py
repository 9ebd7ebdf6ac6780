"""What every ``medfed`` command shares: the console, how a user's mistake is reported, Flower's
log level and handing the process over to a Flower daemon."""

from __future__ import annotations

import argparse
import builtins
import functools
import importlib
import logging
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.markup import escape

console = Console()

Command = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A mistake in what the user asked for (a missing file, a wrong flag): one line, no
    traceback."""


def _error_type(name: str) -> type[BaseException]:
    """``"module.path:ClassName"``, or the name of a built-in exception."""
    if ":" not in name:
        return getattr(builtins, name)
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


def user_errors(*names: str, code: int = 1) -> Callable[[Command], Command]:
    """Decorate a command so that exceptions of the named types (``"server.consortium:
    ConsortiumError"``, ``"FileNotFoundError"``) and :class:`UsageError` are the user's: printed
    as one red ``error:`` line, then exit status ``code``. The names are resolved only when
    something is raised, so each command's heavy imports stay inside the command."""

    def decorate(command: Command) -> Command:
        @functools.wraps(command)
        def run(args: argparse.Namespace) -> int:
            try:
                return command(args)
            except Exception as err:
                if not isinstance(err, (UsageError, *(_error_type(n) for n in names))):
                    raise
                console.print(f"[red]error:[/] {escape(str(err))}", soft_wrap=True)
                return code

        return run

    return decorate


def quiet_flower(verbose: bool) -> None:
    """Flower logs every message at INFO through its own handler; medfed's progress says what
    matters, so Flower shows warnings only unless ``--verbose``. Call after Flower is imported."""
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    flwr_logger.propagate = False
    # Flower's SuperLink state database migrates its schema with alembic, which logs every step.
    logging.getLogger("alembic").setLevel(logging.DEBUG if verbose else logging.WARNING)


def exec_daemon(argv: list[str], print_only: bool, flwr_home: Path,
                extra_env: dict[str, str] | None = None) -> int:
    """Print the daemon's command, or replace this process with it (so that systemd supervises
    Flower's daemon directly and signals reach it). Flower's state goes to ``flwr_home``;
    ``extra_env`` is added to its environment."""
    import os
    import shlex

    from server.daemon import daemon_env

    console.print(shlex.join(argv), markup=False, highlight=False, soft_wrap=True)
    if print_only:
        return 0
    flwr_home.mkdir(parents=True, exist_ok=True)
    os.execve(argv[0], argv, daemon_env(flwr_home, argv[0]) | (extra_env or {}))
    return 1  # not reached
