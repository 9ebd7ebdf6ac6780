"""Flower's deployment engine on loopback with the consortium's PKI: a SuperLink with
TLS and node authentication admits an enrolled hospital's SuperNode and refuses an unenrolled
one. Real processes (flower-superlink, flwr, flower-supernode); about 30 s."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
from helpers import wait_for

from client.daemon import supernode_command
from client.site_folder import CONFIG_FILE as HOSPITAL_CONFIG
from client.site_folder import init_site_folder, load_hospital_config
from medfed_cli.main import main as medfed
from server.consortium import enrol, init_consortium, load_enrolments, revoke
from server.daemon import registry_listing_command, superlink_command
from server.status import hospital_statuses
from server.superlink_gate import READY_LINE
from simulations.processes import free_port, log_contains, stop_process_group


def _free_runtime_port(site: Path) -> None:
    """Give the site's SuperNode a free local port (the default, 9094, may be taken by another
    SuperNode on this machine)."""
    hospital = load_hospital_config(site).__dict__ | {"runtime_port": free_port()}
    (site / HOSPITAL_CONFIG).write_text(tomli_w.dumps({"hospital": hospital}))


def _refused(site: Path, env: dict, log: Path) -> bool:
    """Run the hospital's SuperNode; True if the SuperLink refused it."""
    # Output to a file, not a pipe: the SuperNode's helper processes inherit it.
    with open(log, "w") as out:
        proc = subprocess.Popen(supernode_command(site), stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=120)
    finally:
        stop_process_group(proc)
    return code != 0 and "Failed to activate SuperNode" in log.read_text()


@pytest.mark.slow
def test_tls_superlink_admits_only_enrolled_hospitals(tmp_path):
    port = free_port()
    consortium = tmp_path / "consortium"
    init_consortium(consortium, "loopback", host="127.0.0.1", port=port)
    sites = {}
    for name in ("enrolled", "stranger"):
        sites[name] = tmp_path / name
        init_site_folder(sites[name], name, superlink=f"localhost:{port}")
        _free_runtime_port(sites[name])
        shutil.copy(consortium / "ca" / "ca.pem", sites[name] / "ca.pem")
    enrol(consortium, "enrolled", sites["enrolled"] / "node.pub")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    link_log = tmp_path / "superlink.log"
    with open(link_log, "w") as out:
        link = subprocess.Popen(superlink_command(consortium), stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    node = None
    try:
        wait_for(lambda: log_contains(link_log, READY_LINE), "the SuperLink serving", 300,
                 log=link_log)
        assert medfed(["coordinator", "register", str(consortium)]) == 0
        assert [bool(e.node_id) for e in load_enrolments(consortium)] == [True]
        assert _refused(sites["stranger"], env, tmp_path / "stranger.log")
        assert "No SuperNode found with the given public key" in link_log.read_text()
        node_log = tmp_path / "supernode.log"
        with open(node_log, "w") as out:
            node = subprocess.Popen(supernode_command(sites["enrolled"]), stdout=out,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_for(lambda: log_contains(link_log, "Activated node_id"), "the SuperNode's activation",
                 60, log=[link_log, node_log])
        assert node.poll() is None  # connected and waiting for work
        argv, cli_env = registry_listing_command(consortium)
        listing = subprocess.run(argv, env=cli_env, capture_output=True, text=True, timeout=60)
        assert [(h.name, h.status) for h in hospital_statuses(consortium, listing.stdout)] == [
            ("enrolled", "online")]
        assert medfed(["coordinator", "status", str(consortium)]) == 0
        stop_process_group(node)
        # Revoked and synced: the same hospital is refused at its next connection.
        revoke(consortium, "enrolled")
        assert medfed(["coordinator", "register", str(consortium)]) == 0
        assert load_enrolments(consortium)[0].node_id == ""
        assert _refused(sites["enrolled"], env, tmp_path / "revoked.log")
    finally:
        if node is not None:
            stop_process_group(node)
        stop_process_group(link)


@pytest.mark.parametrize("side", ["coordinator", "hospital"])
def test_insecure_is_explicit_and_warns(tmp_path, side, caplog):
    if side == "coordinator":
        init_consortium(tmp_path, "t")
        argv = superlink_command(tmp_path, insecure=True)
        secure = superlink_command(tmp_path)
        assert "--enable-supernode-auth" in secure and "--ssl-certfile" in secure
    else:
        init_site_folder(tmp_path, "h")
        argv = supernode_command(tmp_path, insecure=True)
    assert "--insecure" in argv
    assert any("plaintext" in r.message for r in caplog.records)
