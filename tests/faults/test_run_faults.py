"""Faults during a real study on loopback: one consortium of two hospitals (``medfed hospital
start``, supervised) and one coordinator, running a 2-round study several times, each time in
its own run directory, with one fault each. The hospitals stay up throughout, as they would in
a consortium; the tests run in file order (each needs the daemons the one before left running).

Each asserts that the run finishes (or fails with a clear reason and then finishes on restart),
that nothing is lost (records, checkpoint removed only once finished, hospitals' audit logs),
that no process a killed daemon started is left, and, where every hospital trained every
round, that the final adapter matches the uninterrupted run's.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pandas as pd
import psutil
import pytest
import torch
from helpers import wait_for
from safetensors.torch import load_file

from client.audit import read_audit_log
from client.supervisor import REVOKED_EXIT, REVOKED_LINE
from client.warm_exec import TASK_STARTED
from faults.harness import (
    all_gone,
    consortium,
    consortium_processes,
    descendants,
    kill9,
    log_has,
    tiny_study,
)
from server.checkpoint import CHECKPOINT_FILE
from server.consortium import load_enrolments
from server.daemon import GATE_MODULE, PID_FILE, WAITING_LINE
from simulations.bench.deploy import LoopbackConsortium

pytestmark = pytest.mark.slow

ADAPTER = "adapter/adapter_model.safetensors"


@pytest.fixture(scope="module")
def lc(tmp_path_factory):
    with consortium(tmp_path_factory.mktemp("run-faults"), tiny_study()) as made:
        made.results = {}  # the uninterrupted run's adapter
        yield made


def _finish(lc: LoopbackConsortium, coordinator: subprocess.Popen, name: str) -> str:
    code = coordinator.wait(timeout=1800)
    log = lc.log("coordinator").read_text(errors="replace")
    assert code == 0, log[-4000:]
    run_dir = lc.folder / "runs" / name
    assert (run_dir / ADAPTER).exists() and not (run_dir / CHECKPOINT_FILE).exists()
    assert not (lc.folder / PID_FILE).exists()
    all_gone(consortium_processes(lc.folder))
    return log


def _trained(lc: LoopbackConsortium, name: str) -> dict[int, set[str]]:
    metrics = pd.read_csv(lc.folder / "runs" / name / "metrics.csv", dtype={"hospital": str})
    rows = metrics[(metrics.hospital != "global") & metrics.train_loss.notna()]
    # Rows name a hospital by its enrolled name (a node id only if it is not enrolled).
    index = {e.node_id: e.name for e in load_enrolments(lc.folder)}
    return {int(r): {index.get(x, x).removeprefix("hospital-") for x in h}
            for r, h in rows.groupby("round")["hospital"]}


def _adapter(lc: LoopbackConsortium, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(lc.folder / "runs" / name / ADAPTER))


def _tasks(lc: LoopbackConsortium, k: int) -> int:
    path = lc.log(f"hospital-{k}")
    return path.read_text(errors="replace").count(TASK_STARTED) if path.exists() else 0


def _audit_rounds(lc: LoopbackConsortium, k: int) -> list[tuple[int, int]]:
    path = lc.sites[k] / "egress-audit.jsonl"
    return [(e["run_id"], e["round"]) for e in read_audit_log(path)
            if e["message_type"] == "train"] if path.exists() else []


def _ensure_hospitals(lc: LoopbackConsortium) -> None:
    """Hospital daemons up (when this test runs alone), and no coordinator left by a test
    that failed before it."""
    lc.kill("coordinator")
    lc.hospitals = getattr(lc, "hospitals", {})
    for k in range(2):
        if k not in lc.hospitals or lc.hospitals[k].poll() is not None:
            lc.hospitals[k] = lc.start_hospital(k)


def test_hospitals_started_long_after_the_coordinator_join_round_1(lc):
    """The uninterrupted run (the others' reference): round 1 waits for every enrolled
    hospital, so two that start while the ServerApp already waits both train it."""
    study = lc.study_copy("reference")
    coordinator = lc.start_coordinator(study)
    wait_for(log_has(lc, "coordinator", WAITING_LINE), "the ServerApp waiting for hospitals",
             alive=coordinator, log=lc.log("coordinator"))
    for k in range(2):
        lc.hospitals = getattr(lc, "hospitals", {}) | {k: lc.start_hospital(k)}
    _finish(lc, coordinator, "reference")
    assert _trained(lc, "reference") == {1: {"0", "1"}, 2: {"0", "1"}}
    for k in range(2):
        assert len(_audit_rounds(lc, k)) == 2
    lc.results["reference"] = _adapter(lc, "reference")


def test_kill9_of_the_coordinator_mid_round_then_restart(lc):
    study = lc.study_copy("coordinator-killed")
    tasks = _tasks(lc, 0)
    coordinator = lc.start_coordinator(study)
    checkpoint = lc.folder / "runs" / "coordinator-killed" / CHECKPOINT_FILE
    wait_for(checkpoint.exists, "round 1's checkpoint", alive=coordinator,
             log=lc.log("coordinator"))
    # Round 2 is under way at hospital 0 (its ClientApp started), then the coordinator dies.
    wait_for(lambda: _tasks(lc, 0) >= tasks + 2, "round 2's training at hospital 0")
    all_gone(kill9(coordinator))
    assert checkpoint.exists()

    coordinator = lc.start_coordinator(study)
    log = _finish(lc, coordinator, "coordinator-killed")
    assert "resuming" in log and "after round 1 of 2" in log
    assert _trained(lc, "coordinator-killed") == {1: {"0", "1"}, 2: {"0", "1"}}
    reference, resumed = lc.results["reference"], _adapter(lc, "coordinator-killed")
    assert reference.keys() == resumed.keys()
    worst = max(float((reference[k] - resumed[k]).abs().max()) for k in reference)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference), \
        f"the resumed adapter differs from the uninterrupted run's by up to {worst}"


def test_superlink_killed_under_running_hospitals_then_restart(lc):
    study = lc.study_copy("superlink-killed")
    coordinator = lc.start_coordinator(study)
    checkpoint = lc.folder / "runs" / "superlink-killed" / CHECKPOINT_FILE
    wait_for(checkpoint.exists, "round 1's checkpoint", alive=coordinator,
             log=lc.log("coordinator"))
    gate = next(p for p in descendants(coordinator.pid) if GATE_MODULE in p.cmdline())
    started = descendants(coordinator.pid)
    gate.send_signal(signal.SIGKILL)
    # The coordinator sees its SuperLink gone, says what to do, and leaves nothing behind.
    assert coordinator.wait(timeout=600) == 1
    log = lc.log("coordinator").read_text(errors="replace")
    assert "did not finish" in log.splitlines()[-1] or "did not finish" in log[-2000:]
    all_gone(started)
    assert all(h.poll() is None for h in lc.hospitals.values())  # hospitals keep trying

    coordinator = lc.start_coordinator(study)
    log = _finish(lc, coordinator, "superlink-killed")
    assert "after round 1 of 2" in log
    assert _trained(lc, "superlink-killed")[2] == {"0", "1"}


def test_kill9_of_a_hospital_mid_round_then_restart(lc):
    _ensure_hospitals(lc)
    study = lc.study_copy("hospital-killed")
    tasks = _tasks(lc, 1)
    before = _audit_rounds(lc, 1)
    coordinator = lc.start_coordinator(study)
    wait_for(lambda: _tasks(lc, 1) > tasks, "round 1's training at hospital 1",
             alive=coordinator, log=lc.log("coordinator"))
    hospital = lc.hospitals.pop(1)
    started = descendants(hospital.pid)
    lc.procs.pop("hospital-1", None)
    hospital.send_signal(signal.SIGKILL)
    hospital.wait()
    all_gone(started)
    # At most its one round-1 reply left before the kill (a 1-step round can finish between
    # the task's start and the kill), and the audit log still reads whole.
    assert len(_audit_rounds(lc, 1)) - len(before) <= 1

    # Round 1 goes on with hospital 0 (min_hospitals = 1); hospital 1 comes back.
    checkpoint = lc.folder / "runs" / "hospital-killed" / CHECKPOINT_FILE
    wait_for(checkpoint.exists, "round 1's checkpoint", alive=coordinator,
             log=lc.log("coordinator"))
    lc.hospitals[1] = lc.start_hospital(1)
    _finish(lc, coordinator, "hospital-killed")
    trained = _trained(lc, "hospital-killed")
    assert "0" in trained[1] and "0" in trained[2], trained
    replied = len(_audit_rounds(lc, 1)) - len(before)
    assert ("1" in trained[1]) <= (replied >= 1), (trained, replied)  # no update from nowhere


def test_revoke_mid_round(lc):
    _ensure_hospitals(lc)
    study = lc.study_copy("revoked")
    tasks = _tasks(lc, 1)
    coordinator = lc.start_coordinator(study)
    wait_for(lambda: _tasks(lc, 1) > tasks, "round 1's training at hospital 1",
             alive=coordinator, log=lc.log("coordinator"))
    done = subprocess.run([sys.executable, "-m", "medfed_cli.main", "coordinator", "revoke",
                           str(lc.folder), "--name", "hospital-1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "unregistered revoked hospital-1" in done.stdout
    # The hospital says so once and stops; its helpers stop with it.
    hospital = lc.hospitals.pop(1)
    started = descendants(hospital.pid)
    assert hospital.wait(timeout=600) == REVOKED_EXIT
    lc.procs.pop("hospital-1", None)
    all_gone(started)
    assert lc.log("hospital-1").read_text(errors="replace").count(REVOKED_LINE) == 1
    # The run goes on with hospital 0 and finishes.
    _finish(lc, coordinator, "revoked")
    trained = _trained(lc, "revoked")
    assert "1" not in trained[2] and trained[2] == {"0"}, trained
    assert psutil.pid_exists(lc.hospitals[0].pid)
