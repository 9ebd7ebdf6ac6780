"""Faults of the coordinator alone, on real processes on loopback (no hospitals needed):
``kill -9`` at each start-up stage leaves nothing running and the same command starts again;
a restart clears what a dead coordinator left (stale pid file, its SuperLink on the port) but
never kills a stranger's process; the CA private key is not needed to start; ``status`` says
when the SuperLink is down."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from helpers import wait_for

from faults.harness import all_gone, consortium_processes, descendants, kill9, log_has
from medfed_cli.main import main as medfed
from server.daemon import PID_FILE, WAITING_LINE, daemon_env, flwr_cli_home, superlink_command
from server.superlink_gate import READY_LINE

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage", ["superlink serving", "serverapp waiting for hospitals"])
def test_kill9_of_the_coordinator_leaves_nothing_and_it_starts_again(lc, stage):
    marker = READY_LINE if stage == "superlink serving" else WAITING_LINE
    coordinator = lc.start_coordinator()
    wait_for(log_has(lc, "coordinator", marker), f"'{marker}' in the coordinator log",
             alive=coordinator, log=lc.log("coordinator"))
    wait_for(lambda: len(descendants(coordinator.pid)) >= 2, "the gate and its SuperExec")
    started = kill9(coordinator)
    all_gone(started)
    assert not consortium_processes(lc.folder)
    assert (lc.folder / PID_FILE).exists()  # what a dead coordinator leaves

    again = lc.start_coordinator()
    wait_for(log_has(lc, "coordinator", READY_LINE, count=2), "the restarted SuperLink",
             alive=again, log=lc.log("coordinator"))
    log = lc.log("coordinator").read_text(errors="replace")
    assert "cleared a stale pid file" in log
    assert "address already in use" not in log.lower()


def test_restart_stops_the_orphan_superlink_of_a_dead_coordinator(lc):
    # The CA's private key is kept offline: starting must not need it.
    (lc.folder / "ca" / "ca.key").unlink()
    # An orphan: this consortium's SuperLink, without a parent-death signal (as an older
    # medfed left it), and the pid file of a coordinator that no longer exists.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (lc.folder / PID_FILE).write_text(json.dumps({"coordinator": dead.pid, "started": 0.0}))
    argv = superlink_command(lc.folder)
    with open(lc.log("orphan"), "w") as out:
        orphan = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True,
                                  env=daemon_env(flwr_cli_home(lc.folder), sys.executable))
    wait_for(log_has(lc, "orphan", READY_LINE), "the orphan SuperLink")
    orphans = [orphan, *descendants(orphan.pid)]

    coordinator = lc.start_coordinator()
    wait_for(log_has(lc, "coordinator", READY_LINE), "the new SuperLink", alive=coordinator,
             log=lc.log("coordinator"))
    log = lc.log("coordinator").read_text(errors="replace")
    assert "stopped the SuperLink a dead coordinator left running" in log
    assert orphan.wait(timeout=60) != 0
    all_gone(orphans[1:])


def test_a_strangers_process_on_the_port_is_refused_not_killed(lc):
    with socket.socket() as stranger:
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        stranger.bind(("127.0.0.1", lc.port))
        stranger.listen()
        code = lc.start_coordinator().wait(timeout=300)
        log = lc.log("coordinator").read_text(errors="replace")
        assert code == 1, log[-2000:]
        assert "not this consortium's SuperLink" in log and str(lc.port) in log
        stranger.getsockname()  # still ours, still open
    assert not (lc.folder / PID_FILE).exists()


def test_status_with_the_superlink_down_says_so_and_fails(lc, capsys):
    assert medfed(["coordinator", "status", str(lc.folder)]) == 1
    out = capsys.readouterr().out
    assert "did not answer" in out and "coordinator start" in out
