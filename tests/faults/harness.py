"""What the fault-injection tests share: a tiny loopback consortium (and its clean-up), waits on
conditions (never on the clock), and a check that no process a daemon started outlives it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import psutil

from simulations.bench.deploy import LoopbackConsortium, default_study
from simulations.config import SimulationConfig

TIMEOUT_S = float(os.environ.get("MEDFED_FAULT_TIMEOUT_S", "900"))
"""The longest any one awaited event may take (a busy 2-core machine is slow, not stuck)."""


def tiny_study(hospitals: int = 2, rounds: int = 2, min_hospitals: int = 1) -> SimulationConfig:
    """2-3 hospitals, 16 px, a few dozen examples, 1 local step, no evaluation round."""
    config = default_study()
    return replace(
        config,
        data=replace(config.data, num_hospitals=hospitals, max_train_examples=24 * hospitals,
                     max_test_examples=32),
        model=replace(config.model, image_size=16),
        train=replace(config.train, local_steps=1, batch_size=8),
        federation=replace(config.federation, rounds=rounds, min_hospitals=min_hospitals,
                           fraction_evaluate=0.0, round_timeout_s=600.0))


@contextlib.contextmanager
def consortium(root: Path, config: SimulationConfig,
               enrolled: int | None = None) -> Iterator[LoopbackConsortium]:
    """A :class:`LoopbackConsortium` of ``config`` under ``root`` (``enrolled``: only the first
    that many hospitals enrolled); on leaving the block every daemon it started is stopped and
    any process of its SuperLink still running is killed."""
    lc = LoopbackConsortium(root, config, enrolled=enrolled)
    try:
        yield lc
    finally:
        lc.stop_all()
        for proc in consortium_processes(lc.folder):
            proc.kill()


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = TIMEOUT_S,
             poll_s: float = 0.3, alive: subprocess.Popen | None = None, log: Path | None = None):
    """Poll ``condition`` until it returns something truthy (returned); fail naming ``what``,
    at once if process ``alive`` ends first (with the tail of ``log``)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise AssertionError(f"exited with {alive.returncode} before {what}:\n{tail}")
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def log_has(lc: LoopbackConsortium, name: str, text: str, count: int = 1) -> Callable[[], bool]:
    def check() -> bool:
        path = lc.log(name)
        return path.exists() and path.read_text(errors="replace").count(text) >= count
    return check


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def all_gone(procs: list[psutil.Process], timeout_s: float = 60) -> None:
    """Assert every process in ``procs`` ends within ``timeout_s`` (zombies count as ended)."""
    def alive() -> list[str]:
        out = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{proc.pid} {' '.join(proc.cmdline()[:4])}")
            except psutil.NoSuchProcess:
                pass
        return out
    end = time.monotonic() + timeout_s
    while alive() and time.monotonic() < end:
        time.sleep(0.3)
    assert not alive(), f"still running: {alive()}"


def kill9(proc: subprocess.Popen) -> list[psutil.Process]:
    """``kill -9`` of ``proc`` alone (not its group); returns what it had started."""
    started = descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return started


def start_hospital(lc: LoopbackConsortium, k: int, backoff_s: float = 1.0) -> subprocess.Popen:
    """The hospital daemon (``medfed hospital start``) of hospital ``k``."""
    return lc._start(f"hospital-{k}", [
        sys.executable, "-m", "medfed_cli.main", "hospital", "start", "--dir", str(lc.sites[k]),
        "--retry-backoff", str(backoff_s), *(["--insecure"] if lc.insecure else [])])


def consortium_processes(folder: Path) -> list[psutil.Process]:
    """Live processes whose command line names ``folder`` (a SuperLink of this consortium)."""
    out = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and str(folder) in " ".join(
                    proc.info["cmdline"] or []):
                out.append(proc)
        except psutil.Error:
            pass
    return out
