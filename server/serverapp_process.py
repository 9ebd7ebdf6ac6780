"""What the coordinator's ServerApp process does beside the rounds, under ``medfed coordinator
start``: wait for the enrolled hospitals before round 1, and stop when the coordinator that
started it is gone.

Both read what ``server.daemon`` (the coordinator process) puts in the ServerApp's environment;
this module imports nothing of the daemon, so the ServerApp (``server.deployment_app``) and the
daemon depend on it and not on each other.
"""

from __future__ import annotations

import logging
import os
import threading
import time

logger = logging.getLogger(__name__)

COORDINATOR_PID_ENV = "MEDFED_COORDINATOR_PID"
"""Environment variable with the pid of ``medfed coordinator start``; its ServerApp (started by
Flower's SuperExec in a session of its own) stops when that process is gone."""
WAIT_ENV = "MEDFED_WAIT_FOR_HOSPITALS"
"""``"<enrolled>:<seconds>"``: the ServerApp waits that long for that many hospitals before
round 1 (:func:`wait_for_hospitals`); set by ``coordinator start``."""
WAITING_LINE = "waiting for the enrolled hospitals"


def wait_for_hospitals(grid, poll_s: float = 1.0) -> int:
    """In the ServerApp, before round 1: wait until every enrolled hospital is connected, or
    the consortium's ``wait_for_hospitals_s`` has passed (``MEDFED_WAIT_FOR_HOSPITALS``; no
    wait outside ``coordinator start``). Returns how many are connected."""
    expected, _, seconds = os.environ.get(WAIT_ENV, "0:0").partition(":")
    expected_n, timeout_s = int(expected or 0), float(seconds or 0)
    end = time.monotonic() + timeout_s
    connected = len(list(grid.get_node_ids()))
    if connected < expected_n and timeout_s > 0:
        logger.info("%s: %d of %d connected; round 1 starts when all are, or in %g s",
                    WAITING_LINE, connected, expected_n, timeout_s)
    while connected < expected_n and time.monotonic() < end:
        time.sleep(poll_s)
        connected = len(list(grid.get_node_ids()))
    if expected_n:
        logger.info("%d of %d enrolled hospitals connected before round 1", connected,
                    expected_n)
    return connected


def stop_with_coordinator(poll_s: float = 1.0) -> threading.Thread | None:
    """In the ServerApp process: exit as soon as the ``medfed coordinator start`` process that
    started the run is gone (killed, crashed).

    Flower's SuperExec starts the ServerApp in a session of its own, so killing the coordinator
    leaves it running; it would reconnect to the restarted coordinator's SuperLink (the state
    is on disk) and go on with the old run beside the resumed one, in the same run directory.
    Returns the watching thread, or None outside a coordinator (no ``MEDFED_COORDINATOR_PID``).
    """
    pid = int(os.environ.get(COORDINATOR_PID_ENV, "0") or 0)
    if pid <= 0:
        return None

    def watch() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                logger.error("the coordinator (pid %d) is gone: this ServerApp stops; the "
                             "restarted coordinator resumes from the last checkpoint", pid)
                os._exit(1)
            except PermissionError:  # alive, another user's
                pass
            time.sleep(poll_s)

    thread = threading.Thread(target=watch, name="stop-with-coordinator", daemon=True)
    thread.start()
    return thread
