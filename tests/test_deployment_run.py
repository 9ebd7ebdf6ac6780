"""A study on Flower's deployment engine on loopback, with separate processes: one
``medfed coordinator start --study`` (SuperLink with TLS and node authentication, ServerApp) and
three ``medfed hospital start`` (SuperNodes, each with its own key, data and audit log).

One scenario proves the three failure stories, judged from the run directory and the hospitals'
audit logs rather than exit codes: hospital 2 is killed while round 1 is under way and round 1
completes with the other two (``min_hospitals = 2``); the coordinator is killed after round 1's
checkpoint and the same command resumes the run, which finishes round 2; hospital 2, started
again, is back in the consortium. Slow (minutes on a busy 2-core machine): real processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import pandas as pd
import pytest
from helpers import wait_for

from client.audit import read_audit_log
from client.warm_exec import TASK_STARTED
from server.checkpoint import CHECKPOINT_FILE
from server.daemon import COORDINATOR_PID_ENV
from simulations.bench.deploy import LoopbackConsortium, default_study
from simulations.processes import log_contains

# Real SuperLink, SuperNodes and ServerApp processes.
pytestmark = pytest.mark.slow


@pytest.fixture
def consortium(tmp_path):
    config = default_study()
    config = replace(
        config,
        data=replace(config.data, num_hospitals=3, max_train_examples=150, max_test_examples=64),
        train=replace(config.train, local_steps=2),
        federation=replace(config.federation, rounds=2, min_hospitals=2, fraction_evaluate=0.0,
                           round_timeout_s=600.0),
    )
    loopback = LoopbackConsortium(tmp_path, config)
    yield loopback
    loopback.stop_all()


def test_hospital_and_coordinator_crashes_do_not_stop_the_study(consortium):
    lc = consortium
    lc.start_coordinator()
    wait_for(lambda: log_contains(lc.log("coordinator"), "registered hospital-2"),
             "the coordinator's registry sync", 180, log=lc.log("coordinator"))
    # Hospital 2's egress audit log is a named pipe with no reader: its ClientApp writes the
    # audit line before a reply may leave, so opening it blocks and round 1's reply cannot
    # leave hospital 2, however fast or slow the machine. It is killed in that state.
    audit_2 = lc.sites[2] / "egress-audit.jsonl"
    os.mkfifo(audit_2)
    for k in range(3):
        lc.start_hospital(k)

    # Hospital 2 dies while its first ClientApp is running: nothing of it left the hospital.
    wait_for(lambda: log_contains(lc.log("hospital-2"), TASK_STARTED),
             "hospital 2's first task", 300, log=lc.log("hospital-2"))
    # That first task is the study check before round 1: its reply cannot leave either, so the
    # run goes on once Flower counts hospital 2 offline (two missed heartbeats, about a minute:
    # this test's longest wait). Restarting hospital 2 at once would end that wait, but it
    # would then train in round 1, which this story keeps it out of.
    lc.kill("hospital-2")
    audit_2.unlink()

    # Round 1 completes with hospitals 0 and 1; the coordinator dies after its checkpoint.
    checkpoint = lc.run_dir / CHECKPOINT_FILE
    wait_for(checkpoint.exists, "round 1's checkpoint", 600, log=lc.log("coordinator"))
    lc.kill("coordinator")
    assert not (lc.run_dir / "adapter").exists()

    # The same command resumes; hospital 2 comes back.
    lc.start_hospital(2)
    coordinator = lc.start_coordinator()
    code = coordinator.wait(timeout=900)
    log = lc.log("coordinator").read_text(errors="replace")
    assert code == 0, log[-4000:]
    assert "resuming" in log and "after round 1 of 2" in log

    assert (lc.run_dir / "adapter" / "adapter_config.json").exists()
    assert not checkpoint.exists()
    metrics = pd.read_csv(lc.run_dir / "metrics.csv", dtype={"hospital": str})
    tested = metrics[metrics.hospital == "global"]
    assert sorted(tested["round"]) == [0, 1, 2]  # the coordinator holds no test set
    trained = metrics[(metrics.hospital != "global") & metrics.train_loss.notna()]
    per_round = trained.groupby("round")["hospital"].apply(set).to_dict()
    assert len(per_round[1]) == 2 and len(per_round[2]) >= 2, per_round
    summary = json.loads((lc.run_dir / "summary.json").read_text())
    assert summary["published"]["round"] == 2  # no evaluation: the last round

    # Each hospital's egress audit log: one train reply per round of each run it took part in,
    # adapter tensors only; the killed hospital logged nothing for round 1. The first
    # coordinator sends round 2 as soon as its checkpoint is written, so a hospital may have
    # answered it before the kill: that reply left the hospital and is logged under that run.
    for k in (0, 1):
        entries = read_audit_log(lc.sites[k] / "egress-audit.jsonl")
        train = [e for e in entries if e["message_type"] == "train"]
        rounds_by_run: dict[int, list[int]] = {}
        for e in train:
            rounds_by_run.setdefault(e["run_id"], []).append(e["round"])
        assert list(rounds_by_run.values())[0] in ([1], [1, 2]), rounds_by_run
        assert list(rounds_by_run.values())[-1] == [2], rounds_by_run
        assert len(rounds_by_run) == 2, rounds_by_run
        assert all(e["error"] is None and e["tensor_bytes"] > 0 for e in train)
        assert {t["record"] for e in train for t in e["tensors"]} == {"arrays"}
    if audit_2.exists():
        assert 1 not in [e["round"] for e in read_audit_log(audit_2)]


def test_the_serverapp_stops_when_its_coordinator_is_gone(tmp_path):
    """Flower starts the ServerApp outside the coordinator's process group: killed, the
    coordinator must not leave it running the old study beside the resumed one."""
    coordinator = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    serverapp = subprocess.Popen(
        [sys.executable, "-c", "import time\n"
         "from server.serverapp_process import stop_with_coordinator\n"
         "assert stop_with_coordinator(poll_s=0.05) is not None\nprint('watching', flush=True)\n"
         "time.sleep(60)"],
        env=dict(os.environ, **{COORDINATOR_PID_ENV: str(coordinator.pid)}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert serverapp.stdout.readline() == "watching\n"  # imported and watching
    assert serverapp.poll() is None
    coordinator.send_signal(signal.SIGKILL)
    coordinator.wait()
    assert serverapp.wait(timeout=20) == 1
    assert f"the coordinator (pid {coordinator.pid}) is gone" in serverapp.stderr.read()
