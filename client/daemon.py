"""The hospital daemon's command line: Flower's ``flower-supernode`` with the consortium's CA,
the hospital's node key and its node config (manifest, policy, ledger, audit log).

``medfed hospital start --dir DIR`` runs it. TLS is always on, except with ``insecure=True``,
which is refused unless the coordinator's address is loopback (tests on one machine; logged as
a warning). The SuperNode always runs with ``--isolation process`` and
:func:`warm_exec_command` is its SuperExec, authenticated to it by a fresh shared secret at
each start: Flower's own executor would import the ClientApp named by the run's FAB, so the
hospital never uses it (``clientapp_executor = "subprocess"`` gives a fresh process per task
from medfed's SuperExec instead, see :mod:`client.warm_exec`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import shutil
import sys
from pathlib import Path

import tomli_w

from client.site_folder import SiteFolderError, load_hospital_config, node_config

logger = logging.getLogger(__name__)

SUPEREXEC_SECRET_FILE = "superexec.secret"
"""Written (0600) at each start: the SuperNode and the warm SuperExec share it."""
NODE_CONFIG_FILE = "node-config.toml"
"""Written at each start from ``hospital.toml``; ``flower-supernode --node-config`` reads a TOML
file whole, so paths with spaces need no quoting."""


def supernode_command(folder: Path, insecure: bool = False,
                      fresh_secret: bool = True) -> list[str]:
    """The ``flower-supernode`` argv for the site folder ``folder`` (writes its node config).

    ``fresh_secret``: write a new SuperExec secret (a start); False keeps the one there (only
    printing the command: a running daemon's SuperNode and SuperExec hold the current one).

    Raises:
        SiteFolderError: the config is unusable, or the CA certificate or key is missing.
        FileNotFoundError: ``flower-supernode`` is not installed.
    """
    folder = Path(folder).resolve()
    config = load_hospital_config(folder)
    exe = _flower_executable("flower-supernode")
    if exe is None:
        raise FileNotFoundError("flower-supernode is not on PATH: install flwr (pip install "
                                "-e .) in the environment that runs the hospital daemon")
    node_config_file = folder / NODE_CONFIG_FILE
    node_config_file.write_text(tomli_w.dumps(node_config(folder, config)))
    if insecure and not is_loopback(config.superlink):
        raise SiteFolderError(
            f"--insecure (no TLS, no node authentication) is refused: the coordinator "
            f"'{config.superlink}' in {folder / 'hospital.toml'} is not on this machine's "
            "loopback. Copy the consortium's ca.pem into the site folder and start without it")
    argv = [exe, "--superlink", config.superlink, "--node-config", str(node_config_file),
            "--port", str(config.runtime_port),
            # Tasks run by medfed's SuperExec only (installed ClientApp, never the FAB's).
            "--isolation", "process",
            "--superexec-auth-secret-file", str(_secret(folder, fresh_secret))]
    if insecure:
        logger.warning("hospital %s: plaintext (--insecure) and no node authentication: for "
                       "loopback tests only, never with patient data", config.name)
        return [*argv, "--insecure"]
    for name, path in (("ca_cert", config.ca_cert), ("node_key", config.node_key)):
        if not (folder / path).is_file():
            raise SiteFolderError(f"{folder / path} is missing ({name} in hospital.toml)"
                                  + ("; copy the consortium's ca.pem there"
                                     if name == "ca_cert" else ""))
    return [*argv, "--root-certificates", str(folder / config.ca_cert),
            "--auth-supernode-private-key", str(folder / config.node_key)]


def warm_exec_command(folder: Path, supernode_pid: int) -> list[str]:
    """medfed's SuperExec argv for the SuperNode of ``folder`` (process ``supernode_pid``):
    warm, or ``--cold`` with ``clientapp_executor = "subprocess"``. Call it after
    :func:`supernode_command`, which writes the shared secret."""
    folder = Path(folder).resolve()
    config = load_hospital_config(folder)
    return [sys.executable, "-m", "client.warm_exec",
            "--runtime-api-address", f"127.0.0.1:{config.runtime_port}",
            "--superexec-auth-secret-file", str(folder / SUPEREXEC_SECRET_FILE),
            *(["--cold"] if config.clientapp_executor == "subprocess" else []),
            "--parent-pid", str(supernode_pid)]  # last: 'hospital start --print-command'


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` (or ``[v6]:port``) names this machine's loopback interface."""
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or "]" in address \
        else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def thread_env(folder: Path) -> dict[str, str]:
    """Environment variables that hold the daemon's ClientApp processes to ``cpu_threads``
    threads (none when it is 0: all cores)."""
    threads = load_hospital_config(Path(folder)).cpu_threads
    if not threads:
        return {}
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def _secret(folder: Path, fresh: bool = True) -> Path:
    """The SuperExec secret file in ``folder``: a new random one (0600, created with that
    mode), or with ``fresh=False`` the one already there (made if there is none)."""
    path = folder / SUPEREXEC_SECRET_FILE
    if not fresh and path.is_file():
        return path
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(32))
    return path


def _flower_executable(name: str) -> str | None:
    """``name`` next to this Python (its virtual environment's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)
