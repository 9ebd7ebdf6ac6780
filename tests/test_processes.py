"""``core.processes``: a child armed with the parent-death signal ends when its parent is
killed (``kill -9``), and one whose parent is already gone exits at once. Real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import psutil
from helpers import wait_for

from core.processes import die_with_parent

# A parent that starts a sleeping child armed to die with it, prints the child's pid, then waits.
PARENT = textwrap.dedent("""
    import subprocess, sys
    from core.processes import dies_with_this_process
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             preexec_fn=dies_with_this_process())
    print(child.pid, flush=True)
    child.wait()
""")


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie counts as ended)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_child_dies_with_its_killed_parent():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        child = int(parent.stdout.readline())
        assert psutil.pid_exists(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        wait_for(lambda: _gone(child), f"child {child} to end with its killed parent",
                 timeout_s=30, poll_s=0.05)
    finally:
        parent.kill()
        parent.wait()


def test_a_child_whose_parent_is_not_the_expected_one_exits_at_once():
    pid = os.fork()
    if pid == 0:  # the child: told its parent is a pid that is not its parent
        die_with_parent(os.getppid() + 1_000_000)
        os._exit(0)  # not reached
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 1


def test_a_child_armed_in_time_stays_while_its_parent_lives():
    pid = os.fork()
    if pid == 0:
        die_with_parent(os.getppid())
        os._exit(7)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 7
