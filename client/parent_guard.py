"""Imported first by the warm SuperExec's forkserver (``client.warm_exec.PRELOAD``): the
forkserver then dies with the SuperExec that started it, however that ends.

Python's forkserver notices its parent's end only between requests, after its preload; the
preload (torch, peft, MONAI) takes tens of seconds on a busy machine, and a forkserver whose
SuperExec was killed meanwhile lived on with its memory. Linux's parent-death signal ends it at
once. Processes forked from it for tasks do not inherit the signal (the kernel clears it).
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """End this process (SIGKILL) when its parent ends; at once if it already has."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before this ran: adopted by init
        os._exit(0)


die_with_parent()
