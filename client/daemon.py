"""The hospital daemon's command line: Flower's ``flower-supernode`` with the consortium's CA,
the hospital's node key and its node config (manifest, policy, ledger, audit log).

``medfed hospital start --dir DIR`` runs it. TLS is always on, except with ``insecure=True``
(loopback tests only; logged as a warning).
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import tomli_w

from client.site_folder import SiteFolderError, load_hospital_config, node_config

logger = logging.getLogger(__name__)

NODE_CONFIG_FILE = "node-config.toml"
"""Written at each start from ``hospital.toml``; ``flower-supernode --node-config`` reads a TOML
file whole, so paths with spaces need no quoting."""


def supernode_command(folder: Path, insecure: bool = False) -> list[str]:
    """The ``flower-supernode`` argv for the site folder ``folder`` (writes its node config).

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
    argv = [exe, "--superlink", config.superlink, "--node-config", str(node_config_file),
            "--port", str(config.runtime_port)]
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


def _flower_executable(name: str) -> str | None:
    """``name`` next to this Python (its virtual environment's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)
