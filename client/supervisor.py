"""The hospital daemon's supervisor: runs the SuperNode (and its warm SuperExec) and keeps the
hospital in the consortium until the coordinator revokes it.

Flower's SuperNode exits for good on a 401/412 from the SuperLink (key not registered yet,
SuperLink restarting) or when it cannot connect, and its helper processes can outlive it.
``medfed hospital start`` runs :func:`supervise` instead:

- the SuperNode and the warm SuperExec are this process's children, set to die with it
  (parent-death signal), and the SuperExec (with its forkserver) is stopped whenever the
  SuperNode ends, however it ends;
- after a refusal, a connection or TLS error, the SuperNode is started again after a backoff
  (``backoff_s``, doubling up to ``max_backoff_s``) with one log line that says why;
- once this key has been admitted (recorded in the site folder, per key), a refusal of the
  key means the coordinator unregistered it: revoked. The supervisor logs one line and stops
  with :data:`REVOKED_EXIT`. A new key (``medfed hospital init``) must be enrolled to return.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from client.daemon import supernode_command, thread_env, warm_exec_command
from client.site_folder import load_hospital_config
from core.processes import dies_with_this_process

logger = logging.getLogger(__name__)

ADMITTED_FILE = "admitted.key"
"""In the site folder: the OpenSSH public key the SuperLink admitted (once it has)."""
REVOKED_EXIT = 3
"""Exit code of :func:`supervise` when the coordinator no longer accepts this hospital's key."""
ADMITTED_LINE = "SuperNode ID:"
"""Flower's SuperNode logs this once the SuperLink has accepted it."""
KEY_REFUSED = ("Failed to activate SuperNode", "Invalid SuperNode authentication")
"""What the SuperNode logs when the SuperLink refuses its key (412 at start, 401 later)."""
SELF_STOPPED = "SuperNode terminated gracefully"
"""Flower's SuperNode answers a 401 by sending itself SIGINT and logging only this; the
supervisor did not stop it, and an operator's Ctrl-C or SIGTERM reaches the supervisor too."""
RETRY_LINE = "not admitted by the coordinator"
REVOKED_LINE = "revoked by the coordinator"


class _Attempt:
    """One SuperNode process: its output copied to ours, and what it said."""

    def __init__(self, argv: Sequence[str], env: dict[str, str],
                 on_admitted: Callable[[], None] = lambda: None) -> None:
        self.on_admitted = on_admitted
        self.admitted = False
        self.refused = False
        self.self_stopped = False
        self.last_lines: list[str] = []
        self.proc = subprocess.Popen(  # noqa: S603 - our own argv
            list(argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=dies_with_this_process())  # noqa: PLW1509 - prctl only
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            sys.stdout.write(line)
            sys.stdout.flush()
            if ADMITTED_LINE in line and not self.admitted:
                self.admitted = True
                self.on_admitted()  # recorded now: a kill -9 of this daemon may come next
            self.refused |= any(text in line for text in KEY_REFUSED)
            self.self_stopped |= SELF_STOPPED in line
            self.last_lines = [*self.last_lines[-4:], line.strip()]

    def wait(self) -> int:
        code = self.proc.wait()
        self._reader.join(timeout=10)
        return code


def _stop(proc: subprocess.Popen | None) -> None:
    """Stop ``proc`` and everything in its process group (the warm SuperExec's forkserver)."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    try:  # the group's members that ignored SIGTERM
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _daemon_env(flwr_home: Path, exe: str) -> dict[str, str]:
    """Flower's state under ``flwr_home`` (not ``~``); its helpers found beside ``exe``."""
    return dict(os.environ, FLWR_HOME=str(flwr_home),
                PATH=os.pathsep.join([str(Path(exe).parent), os.environ.get("PATH", "")]))


def _start(folder: Path, insecure: bool, home: Path,
           daemon_env: Callable[[Path, str], dict[str, str]] | None,
           on_admitted: Callable[[], None], current: dict) -> _Attempt:
    """Start the SuperNode (and its warm SuperExec, filed in ``current``) once."""
    argv = supernode_command(folder, insecure=insecure)
    env = (daemon_env or _daemon_env)(home, argv[0]) | thread_env(folder) \
        | {"PYTHONUNBUFFERED": "1"}
    attempt = _Attempt(argv, env, on_admitted=on_admitted)
    current["node"] = attempt.proc
    warm_argv = warm_exec_command(folder, attempt.proc.pid)
    if warm_argv is not None:
        current["warm"] = subprocess.Popen(  # noqa: S603 - our own argv
            warm_argv, env=env, start_new_session=True,
            preexec_fn=dies_with_this_process())  # noqa: PLW1509 - prctl only
    return attempt


def _revoked(attempt: _Attempt, code: int, key: str, admitted_file: Path,
             insecure: bool) -> bool:
    """The SuperLink refused a key it had admitted before (at activation, 412, or by a 401
    after admission): the coordinator revoked this hospital."""
    was_admitted = bool(key) and admitted_file.is_file() \
        and admitted_file.read_text().strip() == key
    was_admitted |= attempt.admitted and bool(key) and not insecure
    refused = attempt.refused or (attempt.admitted and code == 0 and attempt.self_stopped)
    return refused and was_admitted


def _retry_reason(attempt: _Attempt, code: int) -> str:
    """Why the SuperNode stopped, in words, for the retry line."""
    if attempt.refused:
        return ("this key is not registered at the coordinator (not enrolled yet, or revoked "
                "before this hospital was ever admitted)")
    return (f"the SuperNode exited with code {code}: "
            + (attempt.last_lines[-1] if attempt.last_lines else "no output"))


def supervise(folder: Path, insecure: bool = False, backoff_s: float = 1.0,
              max_backoff_s: float = 60.0, stop: threading.Event | None = None,
              daemon_env: Callable[[Path, str], dict[str, str]] | None = None) -> int:
    """Run the hospital daemon of site folder ``folder`` until ``stop`` is set (or SIGTERM),
    restarting the SuperNode after every failure, or until the coordinator revokes the key.

    ``daemon_env(flwr_home, exe)`` gives the daemons' environment (default: ours).

    Returns:
        0 when stopped, :data:`REVOKED_EXIT` when revoked.

    Raises:
        client.site_folder.SiteFolderError / FileNotFoundError: the site folder or Flower is
            unusable (checked before each start).
    """
    folder = Path(folder).resolve()
    stop = stop or threading.Event()
    name = load_hospital_config(folder).name
    home = folder / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    node_pub = folder / load_hospital_config(folder).node_pub
    key = node_pub.read_text().strip() if node_pub.is_file() else ""
    admitted_file = folder / ADMITTED_FILE
    wait_s = backoff_s
    current: dict[str, subprocess.Popen | None] = {"node": None, "warm": None}

    def record_admission() -> None:
        if key and not insecure:
            admitted_file.write_text(key + "\n")

    def on_term(signum: int, _frame: object) -> None:
        stop.set()
        for proc in current.values():
            if proc is not None and proc.poll() is None:
                proc.terminate()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
    while not stop.is_set():
        attempt = _start(folder, insecure, home, daemon_env, record_admission, current)
        code = attempt.wait()
        _stop(current["warm"])
        current["warm"] = None
        if stop.is_set():
            break
        if _revoked(attempt, code, key, admitted_file, insecure):
            logger.error("hospital %s: %s: the SuperLink no longer accepts this hospital's key; "
                         "stopping (to rejoin, make a new key with 'medfed hospital init' and "
                         "have it enrolled)", name, REVOKED_LINE)
            return REVOKED_EXIT
        if attempt.admitted:
            wait_s = backoff_s  # it ran: start over quickly
        logger.warning("hospital %s: %s: %s; retrying in %.0f s", name, RETRY_LINE,
                       _retry_reason(attempt, code), wait_s)
        if stop.wait(wait_s):
            break
        wait_s = min(max_backoff_s, wait_s * 2)
    logger.info("hospital %s: stopped", name)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m client.supervisor --dir SITE [--insecure]`` (what ``medfed hospital start``
    runs)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m client.supervisor")
    parser.add_argument("--dir", type=Path, required=True, help="the hospital's site folder")
    parser.add_argument("--insecure", action="store_true", help="loopback tests only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return supervise(args.dir, insecure=args.insecure)


if __name__ == "__main__":
    sys.exit(main())
