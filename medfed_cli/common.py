"""What every ``medfed`` command shares: the console, how a user's mistake is reported, Flower's
log level and handing the process over to a Flower daemon."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from core.errors import MedfedError

console = Console()

Command = Callable[[argparse.Namespace], int]


class UsageError(MedfedError):
    """A mistake in what the user asked for (a missing file, a wrong flag): one line, no
    traceback (``medfed_cli.errors``)."""


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
