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
import shutil
import sys
from pathlib import Path

import tomli_w

from server.consortium import CoordinatorConfig, active_keys, check_consortium

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


def register_commands(folder: Path) -> list[list[str]]:
    """``flwr supernode register`` argv for every active enrolment (run each with
    ``FLWR_HOME=flwr_cli_home(folder)`` once the SuperLink is up); Flower's node registry then
    admits exactly the enrolled hospitals."""
    folder = Path(folder).resolve()
    exe = _flower_executable("flwr") or "flwr"
    return [[exe, "supernode", "register", str(folder / "hospitals" / f"{name}.pub"),
             "consortium", "--name", name] for name in active_keys(folder)]
