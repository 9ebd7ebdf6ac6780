"""What the fault-injection tests share: a tiny loopback consortium (and its clean-up), a check
that no process a daemon started outlives it, and ``kill -9``. Waits go through the tests' one
polling helper, ``tests/helpers.py:wait_for``."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import psutil
from helpers import wait_for

from simulations.bench.deploy import LoopbackConsortium, default_study
from simulations.config import SimulationConfig


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
    try:
        wait_for(lambda: not alive(), "every process to end", timeout_s=timeout_s)
    except AssertionError:
        raise AssertionError(f"still running: {alive()}") from None


def kill9(proc: subprocess.Popen) -> list[psutil.Process]:
    """``kill -9`` of ``proc`` alone (not its group); returns what it had started."""
    started = descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return started


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
