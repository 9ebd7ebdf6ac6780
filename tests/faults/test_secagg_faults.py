"""``kill -9`` of a hospital daemon at each SecAgg+ stage, then restarted at once (as a service
manager would), on real processes on loopback: four hospitals (``medfed hospital start``), one
coordinator (``medfed coordinator start``), a 5-round DP-SGD study under secure aggregation.
Round ``r`` kills one hospital right after its egress audit log records its reply to stage
``r`` (setup, share, mask, check, unmask): an event, never a time.

Asserted per round: it finishes with the survivors' sum (or fails with its reason in the
coordinator's log); the killed hospital's audit log and privacy ledger still verify, and the
ledger charged exactly the rounds whose masked update the hospital sent; nothing the killed
daemon started is left; the restarted hospital trains again in a later round; the run ends
with a published adapter.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import replace

import pandas as pd
import pytest
import tomli_w
from helpers import wait_for

from client.audit import read_audit_log, verify_audit_log
from client.site_folder import CONFIG_FILE as HOSPITAL_CONFIG
from client.site_folder import load_hospital_config
from faults.harness import (
    all_gone,
    consortium,
    consortium_processes,
    descendants,
    kill9,
    tiny_study,
)
from faults.test_run_faults import ADAPTER
from privacy.ledger import Ledger
from privacy.secagg.config import STAGES
from server.checkpoint import CHECKPOINT_FILE
from server.consortium import load_enrolments
from simulations.bench.deploy import LoopbackConsortium

pytestmark = pytest.mark.slow

HOSPITALS = 4
SITE_POLICY = 'max_epsilon = 100.0\ndelta = 1e-5\naccountant = "rdp"\nrequire_dp = true\n'
# What each stage's reply carries (its "secagg" config record), as the audit log lists it.
STAGE_FIELD = {"setup": "c-public", "share": "destinations", "mask": "masked-with",
               "check": "signature", "unmask": "seed-of"}


def _study(policy_file: str):
    config = tiny_study(hospitals=HOSPITALS, rounds=len(STAGES), min_hospitals=3)
    federation = config.federation
    return replace(
        config, site_policy=policy_file,
        privacy=replace(config.privacy, dpsgd=True, dp_target_epsilon=20.0, dp_delta=1e-5),
        federation=replace(federation, secure_aggregation=replace(
            federation.secure_aggregation, enabled=True)))


def _stage_replies(lc: LoopbackConsortium, k: int) -> list[tuple[int, str]]:
    """``(round, stage)`` of each SecAgg reply hospital ``k`` audited, errors left out (share,
    check and unmask replies name their round from the stage record)."""
    path = lc.sites[k] / "egress-audit.jsonl"
    out, current = [], 0
    for entry in read_audit_log(path) if path.exists() else []:
        if not entry["message_type"].endswith(".secagg") or entry["error"]:
            continue
        record = entry["configs"].get("secagg", {})
        stage = next((s for s, f in STAGE_FIELD.items() if f in record), "")
        current = entry["round"] or current
        out.append((current, stage))
    return out


def _summed(lc: LoopbackConsortium) -> dict[int, set[str]]:
    """Per round, the hospitals (``"k"``) whose update is in the round's secure sum: those
    with a reply and no error in ``metrics.csv`` (under DP-SGD no training loss is reported)."""
    metrics = pd.read_csv(lc.run_dir / "metrics.csv", dtype={"hospital": str, "error": str})
    rows = metrics[(metrics.hospital != "global") & metrics.num_examples.notna()
                   & metrics.error.isna()]
    # Rows name a hospital by its enrolled name (a node id only if it is not enrolled).
    index = {e.node_id: e.name for e in load_enrolments(lc.folder)}
    return {int(r): {index.get(x, x).removeprefix("hospital-") for x in h}
            for r, h in rows.groupby("round")["hospital"]}


def _charged_rounds(lc: LoopbackConsortium, k: int) -> list[int]:
    path = lc.sites[k] / load_hospital_config(lc.sites[k]).privacy_ledger
    return sorted(r.server_round for r in Ledger(path).rows()) if path.exists() else []


def test_kill9_of_a_hospital_at_each_secagg_stage_then_restart(tmp_path):
    policy = tmp_path / "privacy-policy.toml"
    policy.write_text(SITE_POLICY)
    with consortium(tmp_path / "secagg", _study(str(policy))) as lc:
        for k, site in enumerate(lc.sites):  # a ledger keeps each dataset's budget by its id
            config = tomllib.loads((site / HOSPITAL_CONFIG).read_text())
            config["hospital"]["dataset_id"] = f"site-{k}"
            (site / HOSPITAL_CONFIG).write_text(tomli_w.dumps(config))
        _run(lc)


def _run(lc: LoopbackConsortium) -> None:
    # The hospitals first: they retry until the coordinator serves, so their start-up and the
    # coordinator's overlap (round 1 waits for all of them either way).
    for k in range(HOSPITALS):
        lc.start_hospital(k)
    coordinator = lc.start_coordinator()
    victims: dict[int, int] = {}
    for server_round, stage in enumerate(STAGES, start=1):
        k = (server_round - 1) % HOSPITALS
        victims[server_round] = k
        wait_for(lambda k=k, r=server_round, s=stage: (r, s) in _stage_replies(lc, k),
                 f"hospital {k}'s {stage} reply of round {server_round}", alive=coordinator,
                 log=lc.log("coordinator"))
        name = f"hospital-{k}"
        all_gone(kill9(lc.procs.pop(name)))
        # Nothing lost: the audit log and the ledger still verify, and the ledger charged
        # exactly the rounds whose masked update left this hospital.
        check = verify_audit_log(lc.sites[k] / "egress-audit.jsonl")
        assert check.ok, check.reason
        sent = sorted(r for r, s in _stage_replies(lc, k) if s == "mask")
        assert _charged_rounds(lc, k) == sent, (name, sent)
        lc.start_hospital(k)

    code = coordinator.wait(timeout=1800)
    log = lc.log("coordinator").read_text(errors="replace")
    assert code == 0, log[-4000:]
    run_dir = lc.run_dir
    assert (run_dir / ADAPTER).exists() and not (run_dir / CHECKPOINT_FILE).exists()
    trained = _summed(lc)
    for server_round, k in victims.items():
        done = re.search(rf"round {server_round}: secure aggregate of (\d+) hospitals", log)
        assert done, f"round {server_round} did not finish:\n{log[-4000:]}"
        # The survivors' sum: a hospital killed before its masked update reached the
        # coordinator is not in it; one killed after is (its self-mask is rebuilt from its
        # neighbours' shares). Killed right after the mask reply was audited, the reply may or
        # may not have left: the coordinator's count of masked inputs says which.
        stage = STAGES[server_round - 1]
        in_sum = STAGES.index(stage) > STAGES.index("mask")
        if stage == "mask":
            masked = re.search(rf"round {server_round}: secure aggregation mask stage: (\d+) of "
                               rf"(\d+) replies", log)
            assert masked, log[-4000:]
            in_sum = masked.group(1) == masked.group(2)
        assert (str(k) in trained[server_round]) == in_sum, (server_round, trained)
        assert int(done.group(1)) == len(trained[server_round]) >= 3
        if server_round < len(STAGES):  # back after its restart
            assert any(str(k) in trained[r] for r in range(server_round + 1, len(STAGES) + 1)), \
                (k, trained)
    for k in range(HOSPITALS):
        assert verify_audit_log(lc.sites[k] / "egress-audit.jsonl").ok
        sent = sorted(r for r, s in _stage_replies(lc, k) if s == "mask")
        assert _charged_rounds(lc, k) == sent
    # Stopped, the hospital daemons leave nothing either. The last one restarted may still be
    # importing on a loaded machine (a SIGTERM then ends it before it starts anything): each is
    # stopped once its SuperNode runs, so that stopping it is stopping a running daemon.
    daemons = [lc.procs.pop(f"hospital-{k}") for k in range(HOSPITALS)]
    for k, proc in enumerate(daemons):
        wait_for(lambda proc=proc: descendants(proc.pid), f"hospital {k}'s SuperNode",
                 alive=proc, log=lc.log(f"hospital-{k}"))
    started = [child for proc in daemons for child in descendants(proc.pid)]
    for proc in daemons:  # all at once: each stops its own SuperNode gracefully
        proc.terminate()
    assert [proc.wait(timeout=120) for proc in daemons] == [0] * HOSPITALS
    all_gone(started)
    all_gone(consortium_processes(lc.folder))
