"""Imported first by the warm SuperExec's forkserver (``client.warm_exec.PRELOAD``): the
forkserver then dies with the SuperExec that started it, however that ends.

Python's forkserver notices its parent's end only between requests, after its preload; the
preload (torch, peft, MONAI) takes tens of seconds on a busy machine, and a forkserver whose
SuperExec was killed meanwhile lived on with its memory. Linux's parent-death signal ends it at
once. Processes forked from it for tasks do not inherit the signal (the kernel clears it).
Kept light: only the standard library is loaded before the signal is armed.
"""

from __future__ import annotations

from core.processes import die_with_parent

die_with_parent()
