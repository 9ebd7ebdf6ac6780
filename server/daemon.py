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
import sys
from collections.abc import Callable
from pathlib import Path

import tomli_w

from server.consortium import (
    CoordinatorConfig,
    check_consortium,
    load_enrolments,
    set_node_id,
)

logger = logging.getLogger(__name__)

STATE_DB = "superlink-state.db"
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
    argv = [exe, "--host", config.host, "--port", str(config.port),
            "--database", str(folder / STATE_DB)]
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


def flwr_cli_home(folder: Path, config: CoordinatorConfig | None = None) -> Path:
    """Write ``DIR/flwr-home/config.toml``: the ``flwr`` CLI's connection to this consortium's
    SuperLink over TLS (run ``flwr`` with ``FLWR_HOME`` set to the returned folder)."""
    folder = Path(folder).resolve()
    config = config or check_consortium(folder)
    home = folder / "flwr-home"
    home.mkdir(exist_ok=True)
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {
        "default": "consortium",
        "consortium": {"address": f"{host}:{config.port}",
                       "root-certificates": str(folder / config.ca_cert)},
    }}))
    return home


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
