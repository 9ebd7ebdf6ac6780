"""``kill -9`` of the coordinator during a round's SecAgg+ stages and during its evaluation (after
the round's aggregation, before its checkpoint), each time restarted with the same command, on
real processes on loopback: three hospitals (``medfed hospital start``), a 2-round study under
secure aggregation with federated evaluation after each round, no DP (a hospital's DP noise is
fresh in every run by design, so only a study without it can be compared bit for bit).

The run resumes from its last checkpoint each time and its final adapter is bit-identical to
the uninterrupted run's (every hospital trained every round in both). Each kill waits for an
event in a hospital's egress audit log (its reply to that stage), never for a time.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import wait_for

from client.audit import read_audit_log
from faults.harness import all_gone, consortium, kill9, tiny_study
from faults.test_run_faults import _adapter, _finish, _trained
from faults.test_secagg_faults import STAGE_FIELD
from server.checkpoint import CHECKPOINT_FILE
from simulations.bench.deploy import LoopbackConsortium, study_run_policy

pytestmark = pytest.mark.slow

HOSPITALS = 3
ROUNDS = 2


@pytest.fixture(scope="module")
def lc(tmp_path_factory):
    config = tiny_study(hospitals=HOSPITALS, rounds=ROUNDS, min_hospitals=HOSPITALS)
    federation = config.federation
    config = replace(config, federation=replace(
        federation, fraction_evaluate=1.0,
        secure_aggregation=replace(federation.secure_aggregation, enabled=True)))
    with consortium(tmp_path_factory.mktemp("secagg-coordinator"), config) as made:
        _allow_more_evaluations(made, config)
        yield made


def _allow_more_evaluations(lc: LoopbackConsortium, config) -> None:  # noqa: ANN001
    # Evaluations: the reference run's and the restarted run's, replayed rounds included.
    policy = study_run_policy(config)
    for site in lc.sites:
        (site / "run-policy.toml").write_text(policy.replace(
            f"max_evaluations_per_day = {2 * (ROUNDS + 1)}",
            "max_evaluations_per_day = 50").replace(
            f"max_evaluations_per_run = {ROUNDS + 1}", "max_evaluations_per_run = 50"))
    assert "= 50" in (lc.sites[0] / "run-policy.toml").read_text()


def _replies(lc: LoopbackConsortium, k: int) -> list[tuple[int, str, str]]:
    """``(run id, round, kind)`` of hospital ``k``'s audited replies, errors left out: kind is
    ``evaluate`` or the SecAgg stage (share, check and unmask replies carry no round; they
    belong to the setup before them)."""
    path = lc.sites[k] / "egress-audit.jsonl"
    out, current = [], 0
    for entry in read_audit_log(path) if path.exists() else []:
        if entry["error"]:
            continue
        current = entry["round"] or current
        if entry["message_type"] == "evaluate":
            out.append((entry["run_id"], current, "evaluate"))
        elif entry["message_type"].endswith(".secagg"):
            record = entry["configs"].get("secagg", {})
            stage = next((s for s, f in STAGE_FIELD.items() if f in record), "")
            out.append((entry["run_id"], current, stage))
    return out


def _kill_at(lc: LoopbackConsortium, coordinator, server_round: int, kind: str) -> None:
    """Wait until hospital 0 audits a new ``kind`` reply of ``server_round`` (in this run), then
    ``kill -9`` the coordinator; assert it left nothing running."""
    seen = set(_replies(lc, 0))
    wait_for(lambda: any((r, k) == (server_round, kind) and (run, r, k) not in seen
                         for run, r, k in _replies(lc, 0)),
             f"hospital 0's {kind} reply of round {server_round}", alive=coordinator,
             log=lc.log("coordinator"))
    all_gone(kill9(coordinator))
    lc.procs.pop("coordinator", None)


@pytest.fixture(scope="module")
def reference(lc) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The uninterrupted run's final adapter (run ``reference``, once per module): what every
    interrupted run of the same study must end with."""
    # The hospitals first: they retry until the coordinator serves (start-ups overlap).
    lc.hospitals = {k: lc.start_hospital(k) for k in range(HOSPITALS)}
    coordinator = lc.start_coordinator(lc.study_copy("reference"))
    _finish(lc, coordinator, "reference")
    return _adapter(lc, "reference")


def test_uninterrupted_reference_run(lc, reference):
    every = {str(k) for k in range(HOSPITALS)}
    assert _trained(lc, "reference") == {r: every for r in range(1, ROUNDS + 1)}
    assert reference  # a published adapter


def test_kill9_of_the_coordinator_in_secagg_and_in_evaluation_then_restart(lc, reference):
    study = lc.study_copy("coordinator-killed")
    checkpoint = lc.folder / "runs" / "coordinator-killed" / CHECKPOINT_FILE
    # 1. In round 2's consistency check (SecAgg+ stage 4): round 1 is checkpointed.
    coordinator = lc.start_coordinator(study)
    _kill_at(lc, coordinator, 2, "check")
    assert checkpoint.exists()
    # 2. Restarted: in round 2's evaluation, after its secure aggregate, before its checkpoint.
    coordinator = lc.start_coordinator(study)
    _kill_at(lc, coordinator, 2, "evaluate")
    assert checkpoint.exists()
    # 3. Restarted again: resumes after round 1 each time and finishes.
    coordinator = lc.start_coordinator(study)
    log = _finish(lc, coordinator, "coordinator-killed")
    assert log.count(f"after round 1 of {ROUNDS}") == 2, log[-4000:]
    every = {str(k) for k in range(HOSPITALS)}
    assert _trained(lc, "coordinator-killed") == {r: every for r in range(1, ROUNDS + 1)}
    resumed = _adapter(lc, "coordinator-killed")
    assert reference.keys() == resumed.keys()
    worst = max(float((reference[k] - resumed[k]).abs().max()) for k in reference)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference), \
        f"the resumed adapter differs from the uninterrupted run's by up to {worst}"
