"""The coordinator daemon: Flower's SuperLink with the consortium's TLS files, SuperNode
authentication on, and only the Fleet API on the hospital-facing address.

``medfed coordinator start DIR`` runs it (:func:`run_coordinator`). The SuperLink is Flower's own
application served by :mod:`server.superlink_gate`: Fleet API on ``host:port``, Control and
Runtime APIs on ``127.0.0.1:admin_port`` only, the node registry synced with the enrolment list
before any socket accepts a connection. TLS is always on, except with ``insecure=True``
(loopback tests only; logged as a warning), which also turns node authentication off because
Flower requires TLS for it.

Every process the coordinator starts dies with it, whatever ends it (``kill -9`` included): the
gate is started with a parent-death signal and starts its SuperExec the same way; the
ServerApp stops with the coordinator (``server.serverapp_process.stop_with_coordinator``). A
restart clears what a dead coordinator left (:func:`clear_leftovers`): its pid file, and a
SuperLink of this consortium still holding the ports.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import tomli_w

from core.errors import MedfedError
from core.processes import dies_with_this_process
from server.consortium import (
    CoordinatorConfig,
    check_consortium,
    load_coordinator_config,
    load_enrolments,
    set_node_id,
)
from server.serverapp_process import (  # noqa: F401 (WAITING_LINE: tests wait for it here)
    COORDINATOR_PID_ENV,
    WAIT_ENV,
    WAITING_LINE,
)

logger = logging.getLogger(__name__)

STATE_DB = "superlink-state.db"
"""The SuperLink's SQLite state (runs, registered nodes) in the consortium folder: it survives a
restart, so registered hospitals stay registered."""
PID_FILE = "coordinator.pid"
"""In the consortium folder while ``coordinator start`` runs: its pid and the gate's (JSON)."""
GATE_MODULE = "server.superlink_gate"


class CoordinatorBusy(MedfedError, RuntimeError):
    """Another live coordinator runs this consortium, or a stranger holds its port."""


class SuperLinkError(MedfedError, RuntimeError):
    """The SuperLink did not start, did not listen, or did not answer a listing."""


def superlink_command(folder: Path, insecure: bool = False,
                      config: CoordinatorConfig | None = None) -> list[str]:
    """The SuperLink's argv for the consortium in ``folder`` (:mod:`server.superlink_gate`
    with ``flower-superlink``'s flags).

    Raises:
        server.consortium.ConsortiumError / privacy.pki.KeyFileError: the folder's config or
            certificates are unusable (checked before anything starts).
        FileNotFoundError: ``flower-superlink`` is not installed.
    """
    folder = Path(folder).resolve()
    config = config or check_consortium(folder)
    if _flower_executable("flower-superlink") is None:
        raise FileNotFoundError("flower-superlink is not on PATH: install flwr (pip install "
                                "-e .) in the environment that runs the coordinator")
    # Flower would otherwise 'uv sync' the app's dependencies at run start (a network install,
    # and a CUDA torch): the ServerApp runs with the medfed installed here.
    argv = [sys.executable, "-m", GATE_MODULE, "--consortium", str(folder),
            "--admin-port", str(config.control_port),
            "--host", config.host, "--port", str(config.port),
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
    connection: dict[str, object] = {"address": f"127.0.0.1:{config.control_port}"}
    if insecure:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(folder / config.ca_cert)
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {
        "default": "consortium", "consortium": connection}}))
    return home


def sync_registry(folder: Path, run: Callable[[list[str], dict[str, str]], tuple[int, str]]
                  ) -> list[str]:
    """Make the running SuperLink's node registry match the enrolment list.

    Registers every active enrolment not registered yet (``flwr supernode register``, node id
    kept in the list), unregisters every revoked one still registered and every registered
    node that is no active enrolment's (``flwr supernode unregister``): Flower then refuses
    it at its next request. ``run(argv, env) -> (returncode, output)`` runs one ``flwr``
    command. ``coordinator start`` does the same before the SuperLink listens
    (:func:`server.superlink_gate.sync_registry_state`); this is for a running one.

    Returns:
        One line per action, for the operator; failures start with ``error:``.
    """
    folder = Path(folder).resolve()
    env = dict(os.environ, FLWR_HOME=str(flwr_cli_home(folder)))
    exe = _flower_executable("flwr") or "flwr"
    code, output = run(registry_listing_command(folder)[0], env)
    try:
        listed = registry_nodes(output)
    except SuperLinkError as err:
        return [f"error: {err}"]
    lines = []
    entries = load_enrolments(folder)
    known = {e.node_id for e in entries if e.active and e.node_id}
    for entry in entries:
        if entry.active and entry.node_id not in listed:
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
            if entry.node_id in listed:
                code, output = run([exe, "supernode", "unregister", entry.node_id, "consortium"],
                                   env)
                if code != 0:
                    lines.append(f"error: unregistering {entry.name}: {output.strip()}")
                    continue
            set_node_id(folder, entry.fingerprint, "")
            lines.append(f"unregistered revoked {entry.name} (node {entry.node_id})")
    revoked = {e.node_id for e in entries if not e.active and e.node_id}
    for node_id in sorted(set(listed) - known - revoked):
        code, output = run([exe, "supernode", "unregister", node_id, "consortium"], env)
        lines.append(f"unregistered unknown node {node_id} (on no active enrolment)" if code == 0
                     else f"error: unregistering unknown node {node_id}: {output.strip()}")
    return lines


def registry_nodes(listing_json: str) -> dict[str, dict]:
    """Node id -> node of ``flwr supernode ls --format json`` output, unregistered ones left out.

    Raises:
        SuperLinkError: the output is not a node list (the SuperLink did not answer).
    """
    try:
        listing = json.loads(listing_json)
        nodes = listing["nodes"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise SuperLinkError(f"the SuperLink did not answer: {listing_failure(listing_json)}. "
                             f"Is the coordinator running? ('medfed coordinator start')") from err
    return {n["node-id"]: n for n in nodes if n.get("status") != "unregistered"}


def listing_failure(listing_json: str) -> str:
    """Why ``flwr supernode ls --format json`` gave no node list, in one line: its JSON
    ``error-message`` when it printed one, else its last line that says something (not a lone
    brace of a multi-line JSON object)."""
    try:
        listing = json.loads(listing_json)
    except json.JSONDecodeError:
        listing = None
    if isinstance(listing, dict) and listing.get("error-message"):
        text = " ".join(str(listing["error-message"]).split())
        return text[:300]
    lines = [line.strip() for line in listing_json.splitlines()
             if line.strip().strip('{}[](),"')]
    return lines[-1][:300] if lines else "no output"


def registry_listing_command(folder: Path) -> tuple[list[str], dict[str, str]]:
    """``flwr supernode ls --format json`` for this consortium's SuperLink: argv and env."""
    folder = Path(folder).resolve()
    env = dict(os.environ, FLWR_HOME=str(flwr_cli_home(folder)))
    exe = _flower_executable("flwr") or "flwr"
    return [exe, "supernode", "ls", "consortium", "--format", "json"], env


def run_flwr(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run one ``flwr`` CLI command: ``(returncode, stdout + stderr)``."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


OBJECT_TRANSFERS = 16
"""Concurrent object pulls/pushes per message in Flower's daemons (Flower's default: 2). An
adapter travels as ~100 small tensors, each its own object and HTTP request; 16 at a time is
faster on loopback (figures: docs/benchmarks.md). An operator's own setting wins."""


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
    """Wait until ``host:port`` accepts connections and the listener is ``proc`` (never another
    process that holds the port).

    Raises:
        SuperLinkError: ``proc`` exited first, or ``timeout_s`` passed.
    """
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SuperLinkError(f"the SuperLink exited with code {proc.returncode} before "
                                 f"listening on {host}:{port}; see its log above")
        if proc.pid in _listeners(port):
            return
        time.sleep(0.3)
    raise SuperLinkError(f"the SuperLink did not listen on {host}:{port} within {timeout_s:g} s")


def _listeners(port: int) -> set[int]:
    """Pids of the processes listening on TCP ``port`` (any address)."""
    import psutil

    return {c.pid for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}


def _process(pid: int, started: float | None = None):
    """The live process ``pid`` (and, with ``started``, only if it started then), or None."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if started is not None and abs(proc.create_time() - started) > 0.01:
            return None  # the pid was reused by another process
        return proc if proc.status() != psutil.STATUS_ZOMBIE else None
    except psutil.Error:
        return None


def _is_this_consortiums_superlink(proc, folder: Path) -> bool:
    """A SuperLink (the gate, or Flower's own from an older medfed) of this consortium."""
    import psutil

    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return False
    text = " ".join(cmdline)
    return (GATE_MODULE in cmdline or any(a.endswith("flower-superlink") for a in cmdline[:2])) \
        and str(folder) in text


def clear_leftovers(folder: Path, config: CoordinatorConfig) -> list[str]:
    """Before a start: refuse if a coordinator of this consortium is alive; else stop what a
    dead one left (its SuperLink still on the ports) and remove its pid file.

    Returns:
        One line per thing cleared, for the log.

    Raises:
        CoordinatorBusy: a live coordinator runs this consortium, or a process that is not
            this consortium's SuperLink holds one of its ports.
    """
    import psutil

    folder = Path(folder).resolve()
    lines = []
    pid_file = folder / PID_FILE
    record: dict = {}
    if pid_file.exists():
        try:
            record = json.loads(pid_file.read_text())
        except (OSError, json.JSONDecodeError):
            record = {}
        alive = _process(int(record.get("coordinator", 0) or 0), record.get("started"))
        if alive is not None and alive.pid != os.getpid():
            raise CoordinatorBusy(f"a coordinator of {folder} is running (pid {alive.pid}, see "
                                  f"{pid_file}); stop it first, or wait for its run to end")
        lines.append(f"cleared a stale pid file of a coordinator that died (pid "
                     f"{record.get('coordinator')})")
    gate = _process(int(record.get("gate", 0) or 0), record.get("gate_started"))
    suspects = ({gate.pid} if gate else set()) | _listeners(config.port) \
        | _listeners(config.control_port)
    for pid in sorted(suspects):
        proc = _process(pid)
        if proc is None:
            continue
        if not _is_this_consortiums_superlink(proc, folder):
            try:
                name = " ".join(proc.cmdline()[:3])
            except psutil.Error:
                name = "?"
            raise CoordinatorBusy(
                f"port {config.port} or {config.control_port} is held by pid {pid} ({name}), "
                f"which is not this consortium's SuperLink: stop it, or set other ports in "
                f"{folder / 'coordinator.toml'}")
        for child in [*proc.children(recursive=True), proc]:
            child.kill()
            _wait_dead(child)
        lines.append(f"stopped the SuperLink a dead coordinator left running (pid {pid})")
    pid_file.unlink(missing_ok=True)
    return lines


def _wait_dead(proc, timeout_s: float = 30.0) -> None:
    """Wait until ``proc`` has ended (a zombie counts: its parent, not us, must reap it)."""
    import psutil

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.1)
    raise CoordinatorBusy(f"pid {proc.pid} did not end within {timeout_s:g} s of SIGKILL")


def _write_pid_file(folder: Path, gate: subprocess.Popen | None) -> None:
    import psutil

    record = {"coordinator": os.getpid(), "started": psutil.Process().create_time()}
    if gate is not None:
        record |= {"gate": gate.pid, "gate_started": psutil.Process(gate.pid).create_time()}
    tmp = folder / (PID_FILE + ".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(folder / PID_FILE)


def coordinator_running(folder: Path) -> bool:
    """Whether a live ``coordinator start`` runs the consortium in ``folder``."""
    try:
        record = json.loads((Path(folder) / PID_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return _process(int(record.get("coordinator", 0) or 0), record.get("started")) is not None


def default_run_dir(folder: Path, study: Path) -> Path:
    """``DIR/runs/<study file stem>``: fixed per study, so a restart resumes the same run."""
    folder = Path(folder).resolve()
    return folder / load_coordinator_config(folder).run_dir / Path(study).stem


_REPEATED = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:[A-Z]+:(.*)$")
"""A line of the streamed run log that repeats the line before it (Flower streams a
ServerApp's console line and its log record)."""


def copy_once(lines, out) -> None:
    """Copy ``lines`` (``flwr run --stream`` output) to ``out``, each log line once."""
    previous = ""
    for line in lines:
        repeated = _REPEATED.match(line.rstrip("\n"))
        if repeated and previous.rstrip("\n").endswith(repeated.group(1)):
            continue
        out.write(line)
        out.flush()
        previous = line


def submit_run(folder: Path, study: Path, run_dir: Path, insecure: bool = False) -> int:
    """``flwr run`` the consortium's app on its running SuperLink with ``study``; stream the
    run's logs here (each line once) until it ends. Returns ``flwr run``'s exit code (the run's
    outcome is in ``run_dir``: ``adapter/`` when it finished)."""
    from server.deployment_app import run_config_args, write_app_dir

    folder = Path(folder).resolve()
    app_dir = write_app_dir(folder)
    env = dict(os.environ, FLWR_HOME=str(flwr_cli_home(folder, insecure=insecure)))
    exe = _flower_executable("flwr") or "flwr"
    argv = [exe, "run", str(app_dir), "consortium", *run_config_args(study, run_dir, folder),
            "--stream"]
    logger.info("submitting %s (records in %s)", study, run_dir)
    proc = subprocess.Popen(argv, env=env, cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            preexec_fn=dies_with_this_process())  # noqa: PLW1509 - prctl only
    assert proc.stdout is not None
    copy_once(proc.stdout, sys.stdout)
    return proc.wait()


def run_coordinator(folder: Path, study: Path, run_dir: Path | None = None,
                    insecure: bool = False, startup_timeout_s: float = 120.0) -> int:
    """``medfed coordinator start DIR --study FILE``: start the SuperLink (node registry synced
    with the enrolment list before it listens), run the study to its end, stop the SuperLink.

    Started again after a crash with the same study and run directory, the run resumes after
    its last checkpointed round. Returns 0 when the run finished (its final adapter written).

    Raises:
        core.settings.SettingsError: the study file is unreadable or refuses a setting.
        CoordinatorBusy: another coordinator runs this consortium, or a stranger holds a port.
    """
    from server.study import load_study

    folder = Path(folder).resolve()
    config = check_consortium(folder)
    load_study(Path(study))  # unknown settings, wrong types, bad values fail here, named
    run_dir = Path(run_dir).resolve() if run_dir else default_run_dir(folder, study)
    for line in clear_leftovers(folder, config):
        logger.warning(line)
    argv = superlink_command(folder, insecure, config)
    # The ServerApp inherits this pid through the gate and its SuperExec (see below).
    env = daemon_env(flwr_cli_home(folder, config, insecure), _flower_executable("flwr") or "")
    _write_pid_file(folder, None)
    enrolled = sum(e.active for e in load_enrolments(folder))
    env |= {COORDINATOR_PID_ENV: str(os.getpid()),
            WAIT_ENV: f"{enrolled}:{config.wait_for_hospitals_s:g}"}
    link = subprocess.Popen(argv, env=env,
                            preexec_fn=dies_with_this_process())  # noqa: PLW1509 - prctl only
    try:
        _write_pid_file(folder, link)
        wait_listening("127.0.0.1", config.control_port, link, startup_timeout_s)
        code = submit_run(folder, study, run_dir, insecure)
    finally:
        link.terminate()
        try:
            link.wait(timeout=30)
        except subprocess.TimeoutExpired:
            link.kill()
            link.wait()
        (folder / PID_FILE).unlink(missing_ok=True)
    from server.checkpoint import CHECKPOINT_FILE

    finished = (run_dir / "adapter").is_dir() and not (run_dir / CHECKPOINT_FILE).exists()
    if finished:
        logger.info("run %s: finished", run_dir)
        return 0
    logger.error("run %s: did not finish; %s", run_dir, run_advice(run_dir, code))
    return 1


def run_advice(run_dir: Path, flwr_code: int) -> str:
    """What the operator should do about a run that did not finish, from what it recorded."""
    from server.checkpoint import CHECKPOINT_FILE

    last = last_run_error(run_dir)
    resumable = (run_dir / CHECKPOINT_FILE).exists()
    if last and any(word in last for word in PERMANENT_REFUSALS):
        then = ("it resumes from its last completed round" if resumable else
                "it starts over (no round completed)")
        return (f"hospitals refused it ({last}): the same study is refused again until those "
                f"hospitals change their policies (or you change the study, which starts a "
                f"new run). Once they have, run the same command again: {then}")
    if resumable:
        return "run the same command again to resume from its last completed round"
    if flwr_code != 0:
        return "the run could not be submitted or stopped early (see the lines above)"
    return "run the same command again to start it over (no round completed)"


PERMANENT_REFUSALS = ("policy", "budget", "PolicyError", "BudgetExceeded", "refused")
"""Words of a hospital's error category that a restart cannot fix."""


def last_run_error(run_dir: Path) -> str:
    """The last hospital error recorded in ``run_dir/metrics.csv`` (``""`` when none)."""
    import csv

    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return ""
    with open(path, newline="") as handle:
        errors = [f"round {r.get('round')} {r.get('hospital')}: {r['error']}"
                  for r in csv.DictReader(handle) if r.get("error")
                  # an evaluation refusal alone never ends a run
                  and r["error"] != f"evaluate: {r.get('evaluation_error')}"]
    return errors[-1] if errors else ""
