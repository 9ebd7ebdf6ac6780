"""Helpers for running real daemons in benchmarks and tests: a free port, waiting for a log line
or a listening port, and stopping a process group. One copy, used by ``simulations.bench`` and
``tests/``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

LOOK_EVERY_S = 0.1
"""How often a wait looks at its condition (seconds); the wait's timeout is the bound."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Wait until ``condition()`` is true; False if ``timeout_s`` seconds pass first."""
    end = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(LOOK_EVERY_S)


def log_contains(path: Path, text: str) -> bool:
    """Whether the log file ``path`` exists and holds ``text``."""
    return path.exists() and text in path.read_text(errors="replace")


def wait_for_log(path: Path, text: str, timeout_s: float) -> bool:
    """Wait until ``text`` appears in the log file ``path``; False after ``timeout_s``."""
    return wait_until(lambda: log_contains(path, text), timeout_s)


def wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    """Wait until something listens on 127.0.0.1:``port``.

    Raises:
        RuntimeError: ``proc`` exited first.
        TimeoutError: nothing listened within ``timeout_s`` seconds.
    """
    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    if not wait_until(listening, timeout_s):
        raise TimeoutError(f"nothing listened on port {port} within {timeout_s} s")


def stop_process_group(proc: subprocess.Popen, sig: int = signal.SIGTERM,
                       grace_s: float = 15.0) -> None:
    """Send ``sig`` to the process group ``proc`` leads (started with
    ``start_new_session=True``) and wait for ``proc``; SIGKILL the group after ``grace_s``."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
