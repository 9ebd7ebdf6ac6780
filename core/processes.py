"""Processes that must not outlive the process that started them (Linux).

The coordinator's and the hospital's daemons start helpers (SuperLink, SuperExec, SuperNode,
forkserver, ClientApp tasks) that would otherwise live on, holding ports and memory, after
``kill -9`` of their parent. Linux's parent-death signal ends them with it. Kept to the
standard library: the warm SuperExec's forkserver imports this before anything else.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
"""``prctl`` option: the signal this process gets when its parent ends."""


def die_with_parent(parent: int | None = None) -> None:
    """Make this process get SIGKILL when its parent ends; exit at once if it already has.

    Args:
        parent: the pid the parent must still have (default: only check that this process was
            not adopted by init). A forked child's parent can end before ``prctl`` takes effect;
            the check closes that window.

    Raises:
        OSError: ``prctl`` failed (not Linux).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    orphaned = os.getppid() != parent if parent is not None else os.getppid() == 1
    if orphaned:
        os._exit(1)


def dies_with_this_process() -> Callable[[], None]:
    """A ``subprocess.Popen`` ``preexec_fn`` for a child that must not outlive the calling
    process, however it ends (``kill -9`` included)."""
    parent = os.getpid()

    def arm() -> None:
        die_with_parent(parent)

    return arm
