"""A thief runs a second hospital daemon with a copy of a hospital's ``node.key``, on real
processes on loopback (the coordinator's SuperLink behind its gate, TLS, node authentication,
the real ``flower-supernode``): the second live SuperNode is refused - the node unregistered,
its enrolment revoked, a CRITICAL line in the coordinator's log - and the hospital's own daemon
stops as revoked, while the other hospital stays admitted. The in-process version of the same
attack is in ``tests/adversarial/test_attack_roster_and_stolen_keys.py``.

The coordinator here counts heartbeats signed less than 10 s apart as close
(``second_session_gap_s`` in ``coordinator.toml``; default 5 s). With the default, Flower's
randomised 17.5-22.5 s heartbeat periods can keep two SuperNodes' heartbeats more than 5 s
apart for many periods (docs/results/2026-12-08-suite-speed.md: how long, by gap); with 10 s,
nearly every period gives a close pair. Everything the attack goes through is the same: the
real SuperNodes' signed heartbeats, the gate's count of close pairs (three), the unregistering,
the revocation and the victim's daemon stopping. The default gap's rule against real Flower
timings (and that restarts and retried heartbeats are not flagged) is in the in-process tests
named above."""

from __future__ import annotations

import shutil
import sys
import tomllib

import pytest
import tomli_w
from faults.harness import consortium, log_has, tiny_study
from helpers import wait_for

from client.site_folder import CONFIG_FILE, load_hospital_config
from client.supervisor import ADMITTED_LINE, REVOKED_EXIT
from core.flower_compat import SECOND_SESSION_GAP_S
from server.consortium import CONFIG_FILE as COORDINATOR_CONFIG
from server.consortium import (
    ConsortiumError,
    init_consortium,
    load_coordinator_config,
    load_enrolments,
)
from simulations.processes import free_port

SECOND_SESSION_LINE = "its key runs two live SuperNodes at once"
GAP_S = 10.0


def _set_gap(folder, gap_s) -> None:  # noqa: ANN001
    path = folder / COORDINATOR_CONFIG
    config = tomllib.loads(path.read_text())
    config["coordinator"]["second_session_gap_s"] = gap_s
    path.write_text(tomli_w.dumps(config))


def test_the_second_session_gap_is_read_with_its_limits(tmp_path):
    init_consortium(tmp_path, "limits", host="127.0.0.1", port=free_port())
    assert load_coordinator_config(tmp_path).second_session_gap_s == SECOND_SESSION_GAP_S
    _set_gap(tmp_path, GAP_S)
    assert load_coordinator_config(tmp_path).second_session_gap_s == GAP_S
    for refused in (4.9, 17.5):  # below the call timeout; above a single SuperNode's period
        _set_gap(tmp_path, refused)
        with pytest.raises(ConsortiumError, match=f"second_session_gap_s.*{refused}"):
            load_coordinator_config(tmp_path)


@pytest.mark.slow
def test_a_second_daemon_on_a_copied_node_key_is_refused(tmp_path):
    with consortium(tmp_path, tiny_study(hospitals=2)) as lc:
        _set_gap(lc.folder, GAP_S)
        lc._start("coordinator", [sys.executable, "-m", "medfed_cli.main", "coordinator",
                                  "start", str(lc.folder)])  # the SuperLink alone
        victim = lc.start_hospital(0, retry_backoff_s=0.5)
        lc.start_hospital(1, retry_backoff_s=0.5)
        for k in (0, 1):
            wait_for(log_has(lc, f"hospital-{k}", ADMITTED_LINE), f"hospital-{k} admitted")

        thief_site = tmp_path / "thief"  # the stolen folder: the same node.key
        shutil.copytree(lc.sites[0], thief_site,
                        ignore=shutil.ignore_patterns("flwr-home", "*.secret", "*.log"))
        config = load_hospital_config(thief_site).__dict__ | {"runtime_port": free_port()}
        (thief_site / CONFIG_FILE).write_text(tomli_w.dumps({"hospital": config}))
        lc.sites.append(thief_site)
        lc.start_hospital(2, retry_backoff_s=0.5)

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
