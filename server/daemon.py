"""The coordinator daemon's command line: Flower's ``flower-superlink`` with the consortium's TLS
files and SuperNode authentication on.

``medfed coordinator start DIR`` runs it. TLS is always on, except with ``insecure=True`` (loopback
tests only; logged as a warning), which also turns node authentication off because Flower
requires TLS for it. The enrolled hospitals' keys are what the operator registers with the
running SuperLink (``flwr supernode register DIR/hospitals/NAME.pub``); Flower then refuses a
SuperNode whose key is not registered.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import tomli_w

from server.consortium import (
    CoordinatorConfig,
    check_consortium,
    load_coordinator_config,
    load_enrolments,
    set_node_id,
)

logger = logging.getLogger(__name__)

STATE_DB = "superlink-state.db"
COORDINATOR_PID_ENV = "MEDFED_COORDINATOR_PID"
"""Environment variable with the pid of ``medfed coordinator start``; its ServerApp (started by
Flower's SuperExec, outside the coordinator's process group) stops when that process is gone."""
"""The SuperLink's SQLite state (runs, registered nodes) in the consortium folder: it survives a
restart, so registered hospitals stay registered."""


def superlink_command(folder: Path, insecure: bool = False,
                      config: CoordinatorConfig | None = None) -> list[str]:
    """The ``flower-superlink`` argv for the consortium in ``folder``.

    Raises:
        server.consortium.ConsortiumError / privacy.pki.KeyFileError: the folder's config or
            certificates are unusable (checked before anything starts).
        FileNotFoundError: ``flower-superlink`` is not installed.
    """
    folder = Path(folder).resolve()
    config = config or check_consortium(folder)
    exe = _flower_executable("flower-superlink")
    if exe is None:
        raise FileNotFoundError("flower-superlink is not on PATH: install flwr (pip install "
                                "-e .) in the environment that runs the coordinator")
    # Flower would otherwise 'uv sync' the app's dependencies at run start (a network install,
    # and a CUDA torch): the ServerApp runs with the medfed installed here.
    argv = [exe, "--host", config.host, "--port", str(config.port),
            "--database", str(folder / STATE_DB), "--disable-runtime-dependency-installation"]
    if insecure:
        logger.warning("coordinator: plaintext (--insecure) and no hospital authentication: "
                       "for loopback tests only, never with patient data")
        return [*argv, "--insecure"]
    return [*argv,
            "--ssl-ca-certfile", str(folder / config.ca_cert),
            "--ssl-certfile", str(folder / config.server_cert),
            "--ssl-keyfile", str(folder / config.server_key),
            "--enable-supernode-auth"]


def _flower_executable(name: str) -> str | None:
    """``name`` next to this Python (its virtual environment's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def flwr_cli_home(folder: Path, config: CoordinatorConfig | None = None,
                  insecure: bool = False) -> Path:
    """Write ``DIR/flwr-home/config.toml``: the ``flwr`` CLI's connection to this consortium's
    SuperLink over TLS (run ``flwr`` with ``FLWR_HOME`` set to the returned folder). The
    SuperLink keeps its Flower state (installed apps) there too, out of the user's home."""
    folder = Path(folder).resolve()
    config = config or check_consortium(folder)
    home = folder / "flwr-home"
    home.mkdir(exist_ok=True)
    connection: dict[str, object] = {"address": f"{_local_host(config)}:{config.port}"}
    if insecure:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(folder / config.ca_cert)
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {
        "default": "consortium", "consortium": connection}}))
    return home


def _local_host(config: CoordinatorConfig) -> str:
    """Where this machine reaches its own SuperLink."""
    return "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host


def sync_registry(folder: Path, run: Callable[[list[str], dict[str, str]], tuple[int, str]]
                  ) -> list[str]:
    """Make the running SuperLink's node registry match the enrolment list.

    Registers every active enrolment not registered yet (``flwr supernode register``, node id
    kept in the list) and unregisters every revoked one still registered (``flwr supernode
    unregister``), so that Flower refuses a revoked hospital at its next connection.
    ``run(argv, env) -> (returncode, output)`` runs one ``flwr`` command.

    Returns:
        One line per action, for the operator; failures start with ``error:``.
    """
    folder = Path(folder).resolve()
    env = dict(os.environ, FLWR_HOME=str(flwr_cli_home(folder)))
    exe = _flower_executable("flwr") or "flwr"
    lines = []
    for entry in load_enrolments(folder):
        if entry.active and not entry.node_id:
            argv = [exe, "supernode", "register", str(folder / "hospitals" / f"{entry.name}.pub"),
                    "consortium", "--name", entry.name]
            code, output = run(argv, env)
            found = re.search(r"SuperNode (\d+) registered", output)
            if code == 0 and found:
                set_node_id(folder, entry.fingerprint, found.group(1))
                lines.append(f"registered {entry.name} (node {found.group(1)})")
            else:
                lines.append(f"error: registering {entry.name}: {output.strip()}")
        elif not entry.active and entry.node_id:
            code, output = run([exe, "supernode", "unregister", entry.node_id, "consortium"], env)
            if code == 0:
                set_node_id(folder, entry.fingerprint, "")
                lines.append(f"unregistered revoked {entry.name} (node {entry.node_id})")
            else:
                lines.append(f"error: unregistering {entry.name}: {output.strip()}")
    return lines


def registry_listing_command(folder: Path) -> tuple[list[str], dict[str, str]]:
    """``flwr supernode ls --format json`` for this consortium's SuperLink: argv and env."""
    folder = Path(folder).resolve()
    env = dict(os.environ, FLWR_HOME=str(flwr_cli_home(folder)))
    exe = _flower_executable("flwr") or "flwr"
    return [exe, "supernode", "ls", "consortium", "--format", "json"], env


def _run_flwr(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


OBJECT_TRANSFERS = 16
"""Concurrent object pulls/pushes per message in Flower's daemons (Flower's default: 2). An
adapter travels as ~100 small tensors, each its own object and HTTP request; 16 at a time cut
the loopback deploy benchmark from 140 s to 118 s. An operator's own setting wins."""


def daemon_env(flwr_home: Path, exe: str) -> dict[str, str]:
    """The environment Flower's daemons run in: their state under ``flwr_home`` (not ``~``),
    and the helpers they start by name (``flower-superexec``, ``flwr-serverapp``) found beside
    them."""
    return dict(os.environ, FLWR_HOME=str(flwr_home),
                PATH=os.pathsep.join([str(Path(exe).parent), os.environ.get("PATH", "")]),
                **{name: os.environ.get(name, str(OBJECT_TRANSFERS)) for name in (
                    "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS",
                    "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES")})


def wait_listening(host: str, port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    """Wait until ``host:port`` accepts connections.

    Raises:
        RuntimeError: ``proc`` exited first, or ``timeout_s`` passed.
    """
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with code {proc.returncode} before "
                               f"listening on {host}:{port}; see its log above")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the SuperLink did not listen on {host}:{port} within {timeout_s:g} s")


def default_run_dir(folder: Path, study: Path) -> Path:
    """``DIR/runs/<study file stem>``: fixed per study, so a restart resumes the same run."""
    folder = Path(folder).resolve()
    return folder / load_coordinator_config(folder).run_dir / Path(study).stem


def submit_run(folder: Path, study: Path, run_dir: Path, insecure: bool = False) -> int:
    """``flwr run`` the consortium's app on its running SuperLink with ``study``; stream the
    run's logs here until it ends. Returns ``flwr run``'s exit code (the run's outcome is in
    ``run_dir``: ``adapter/`` when it finished)."""
    from server.deployment_app import run_config_args, write_app_dir

    folder = Path(folder).resolve()
    app_dir = write_app_dir(folder)
    env = dict(os.environ, FLWR_HOME=str(flwr_cli_home(folder, insecure=insecure)))
    exe = _flower_executable("flwr") or "flwr"
    argv = [exe, "run", str(app_dir), "consortium", *run_config_args(study, run_dir), "--stream"]
    logger.info("submitting %s (records in %s)", study, run_dir)
    return subprocess.run(argv, env=env, cwd=folder).returncode


def run_coordinator(folder: Path, study: Path, run_dir: Path | None = None,
                    insecure: bool = False, startup_timeout_s: float = 120.0) -> int:
    """``medfed coordinator start DIR --study FILE``: start the SuperLink, register the enrolled
    hospitals, run the study to its end, stop the SuperLink.

    Started again after a crash with the same study and run directory, the run resumes after
    its last checkpointed round. Returns 0 when the run finished (its final adapter written).

    Raises:
        simulations.config.ConfigError: the study file is unreadable or names unknown settings.
    """
    from simulations.config import load_config

    folder = Path(folder).resolve()
    config = check_consortium(folder)
    load_config(Path(study))  # unknown settings and wrong types fail here, naming the file
    run_dir = Path(run_dir).resolve() if run_dir else default_run_dir(folder, study)
    argv = superlink_command(folder, insecure, config)
    # The ServerApp inherits this pid through the SuperLink and SuperExec (see below).
    env = daemon_env(flwr_cli_home(folder, config, insecure), argv[0])
    link = subprocess.Popen(argv, env=env | {COORDINATOR_PID_ENV: str(os.getpid())})
    try:
        wait_listening(_local_host(config), config.port, link, startup_timeout_s)
        if not insecure:
            for line in sync_registry(folder, _run_flwr):
                (logger.error if line.startswith("error:") else logger.info)(line)
        submit_run(folder, study, run_dir, insecure)
    finally:
        link.terminate()
        try:
            link.wait(timeout=30)
        except subprocess.TimeoutExpired:
            link.kill()
            link.wait()
    from server.checkpoint import CHECKPOINT_FILE

    finished = (run_dir / "adapter").is_dir() and not (run_dir / CHECKPOINT_FILE).exists()
    (logger.info if finished else logger.error)(
        "run %s: %s", run_dir, "finished" if finished else "did not finish; run the same "
        "command again to resume from its last completed round")
    return 0 if finished else 1


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
