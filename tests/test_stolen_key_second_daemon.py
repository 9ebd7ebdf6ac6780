"""A thief runs a second hospital daemon with a copy of a hospital's ``node.key``, on real
processes on loopback (the coordinator's SuperLink behind its gate, TLS, node authentication,
the real ``flower-supernode``): the second live SuperNode is refused - the node unregistered,
its enrolment revoked, a CRITICAL line in the coordinator's log - and the hospital's own daemon
stops as revoked, while the other hospital stays admitted. The in-process version of the same
attack is in ``tests/adversarial/test_attack_roster_and_stolen_keys.py``."""

from __future__ import annotations

import shutil
import sys

import pytest
import tomli_w
from faults.harness import consortium, log_has, start_hospital, tiny_study, wait_for

from client.site_folder import CONFIG_FILE, load_hospital_config
from client.supervisor import ADMITTED_LINE, REVOKED_EXIT
from server.consortium import load_enrolments
from simulations.processes import free_port

pytestmark = pytest.mark.slow

SECOND_SESSION_LINE = "its key runs two live SuperNodes at once"


def test_a_second_daemon_on_a_copied_node_key_is_refused(tmp_path):
    with consortium(tmp_path, tiny_study(hospitals=2)) as lc:
        lc._start("coordinator", [sys.executable, "-m", "medfed_cli.main", "coordinator",
                                  "start", str(lc.folder)])  # the SuperLink alone
        victim = start_hospital(lc, 0, backoff_s=0.5)
        start_hospital(lc, 1, backoff_s=0.5)
        for k in (0, 1):
            wait_for(log_has(lc, f"hospital-{k}", ADMITTED_LINE), f"hospital-{k} admitted")

        thief_site = tmp_path / "thief"  # the stolen folder: the same node.key
        shutil.copytree(lc.sites[0], thief_site,
                        ignore=shutil.ignore_patterns("flwr-home", "*.secret", "*.log"))
        config = load_hospital_config(thief_site).__dict__ | {"runtime_port": free_port()}
        (thief_site / CONFIG_FILE).write_text(tomli_w.dumps({"hospital": config}))
        lc.sites.append(thief_site)
        start_hospital(lc, 2, backoff_s=0.5)

        wait_for(log_has(lc, "coordinator", SECOND_SESSION_LINE), "the second session refused",
                 timeout_s=900)
        line = next(t for t in lc.log("coordinator").read_text().splitlines()
                    if SECOND_SESSION_LINE in t)
        assert "hospital-0" in line and "CRITICAL" in line
        entries = {e.name: e for e in load_enrolments(lc.folder)}
        assert entries["hospital-0"].revoked_at and not entries["hospital-1"].revoked_at
        assert wait_for(lambda: victim.poll() is not None, "the victim's daemon stopping",
                        timeout_s=600) and victim.returncode == REVOKED_EXIT
        assert lc.procs["hospital-1"].poll() is None  # the other hospital is untouched
