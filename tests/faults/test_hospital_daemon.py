"""Faults of a hospital daemon (``medfed hospital start``: the supervisor, its SuperNode and warm
SuperExec), on real processes on loopback: started before the coordinator, or before its key is
enrolled, it keeps retrying and is admitted; a SuperNode that dies at start-up takes its warm
SuperExec (and forkserver) with it; ``kill -9`` of the daemon leaves nothing running."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import pytest
import tomli_w
from helpers import wait_for

from client.site_folder import CONFIG_FILE, init_site_folder, load_hospital_config
from client.supervisor import ADMITTED_LINE, RETRY_LINE
from faults.harness import all_gone, descendants, kill9, log_has
from server.consortium import enrol
from simulations.processes import free_port

pytestmark = pytest.mark.slow

WARM_STARTED = "warm SuperExec for"


def test_hospital_started_before_the_coordinator_is_admitted_when_it_starts(lc):
    hospital = lc.start_hospital(0, retry_backoff_s=0.5)
    wait_for(log_has(lc, "hospital-0", WARM_STARTED), "the hospital daemon's warm SuperExec")
    lc.start_coordinator()
    wait_for(log_has(lc, "hospital-0", ADMITTED_LINE), "hospital-0 admitted")
    assert hospital.poll() is None


def test_a_hospital_enrolled_after_it_started_is_admitted(lc, tmp_path):
    site = tmp_path / "late"
    init_site_folder(site, "late", superlink=f"localhost:{lc.port}")
    shutil.copy(lc.folder / "ca" / "ca.pem", site / "ca.pem")
    config = load_hospital_config(site).__dict__ | {"runtime_port": free_port(),
                                                     "privacy_policy": ""}
    (site / CONFIG_FILE).write_text(tomli_w.dumps({"hospital": config}))
    lc.sites.append(site)
    lc.start_coordinator()
    wait_for(log_has(lc, "coordinator", "registered hospital-1"), "the SuperLink's registry")
    hospital = lc.start_hospital(2, retry_backoff_s=0.5)
    # Refused (412: key not registered): the daemon says so and keeps trying.
    wait_for(log_has(lc, "hospital-2", RETRY_LINE), "the refusal logged")
    assert "not registered at the coordinator" in lc.log("hospital-2").read_text()
    assert hospital.poll() is None
    enrol(lc.folder, "late", site / "node.pub")
    done = subprocess.run([sys.executable, "-m", "medfed_cli.main", "coordinator", "register",
                           str(lc.folder)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "registered late" in done.stdout, done.stdout + done.stderr
    wait_for(log_has(lc, "hospital-2", ADMITTED_LINE), "the late hospital admitted")
    assert hospital.poll() is None


def test_a_supernode_that_dies_at_start_up_takes_its_warm_superexec_along(lc):
    # The SuperNode's Runtime API port is taken: it exits during start-up.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", load_hospital_config(lc.sites[0]).runtime_port))
        squatter.listen()
        hospital = lc.start_hospital(0, retry_backoff_s=3600)
        wait_for(log_has(lc, "hospital-0", RETRY_LINE), "the SuperNode's start-up failure")
    log = lc.log("hospital-0").read_text(errors="replace")
    assert "the SuperNode exited with code" in log
    # Until the next attempt the daemon holds no process: no warm SuperExec, no forkserver.
    all_gone(descendants(hospital.pid), timeout_s=30)
    assert hospital.poll() is None


def test_kill9_of_a_hospital_daemon_leaves_nothing(lc):
    hospital = lc.start_hospital(0)
    wait_for(log_has(lc, "hospital-0", WARM_STARTED), "the warm SuperExec")
    # The SuperNode, the warm SuperExec and its forkserver.
    wait_for(lambda: len(descendants(hospital.pid)) >= 3, "the daemon's helper processes")
    started = kill9(hospital)
    all_gone(started)
