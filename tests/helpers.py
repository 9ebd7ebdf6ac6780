"""The tests' one polling helper: wait for a condition (never for a time), with a deadline and a
failure that says what was awaited and shows the tails of the logs that explain it."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

TIMEOUT_S = float(os.environ.get("MEDFED_FAULT_TIMEOUT_S", "900"))
"""The longest any one awaited event may take by default (seconds): a busy 2-core machine is
slow, not stuck."""

POLL_S = 0.3
"""How often the condition is looked at (seconds); the deadline, not this, bounds a wait."""


def _tails(logs: Path | Sequence[Path] | None) -> str:
    """The last 3,000 characters of each existing log in ``logs``, headed by its path."""
    paths = [logs] if isinstance(logs, Path) else list(logs or ())
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in paths if p.exists())


def wait_for(condition: Callable[[], T], what: str, timeout_s: float = TIMEOUT_S,
             poll_s: float = POLL_S, alive: subprocess.Popen | None = None,
             log: Path | Sequence[Path] | None = None) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    Args:
        condition: called every ``poll_s`` seconds; its first truthy value is returned.
        what: what is awaited, for the failure message.
        timeout_s: the deadline (seconds from now).
        poll_s: seconds between two looks.
        alive: a process whose end before the condition holds fails the wait at once.
        log: one log file or several, whose tails the failure message shows.

    Raises:
        AssertionError: the deadline passed, or ``alive`` ended first.
    """
    end = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"exited with {alive.returncode} before {what}:\n{_tails(log)}")
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}\n"
                                 f"{_tails(log)}")
        time.sleep(poll_s)
