"""The record says what happened (issue #34, item 4): a revocation is recorded as one, the
report names a test set only where there is one, ``coordinator status`` with the SuperLink down
says why in one clean line, and ``hospital ledger`` shows whole ids and counts charges."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from client.site_folder import init_site_folder
from privacy.ledger import Charge, Ledger, run_spends
from server.consortium import enrol, init_consortium, revoke, set_node_id
from server.daemon import SuperLinkError, registry_nodes
from server.deployment_app import revocations
from server.records import RunRecords
from simulations.report.page import held_out_sentence
from simulations.report.runs import Run
from strategies.replies import Reply

UNAVAILABLE = "hospital error: Node Unavailable: the node did not send a heartbeat in time"


def test_a_revoked_hospitals_round_is_recorded_as_a_revocation(tmp_path):
    folder = tmp_path / "consortium"
    init_consortium(folder, "test")
    site = init_site_folder(tmp_path / "st-mary", "st-mary")
    entry = enrol(folder, "st-mary", tmp_path / "st-mary" / site.node_pub)
    set_node_id(folder, entry.fingerprint, "4242")
    records = RunRecords(tmp_path / "run", revoked=revocations(folder))
    records.add_reply(Reply(server_round=1, phase="train", node_id=4242, error=UNAVAILABLE))
    assert records.rows[(1, "4242")]["error"] == f"train: {UNAVAILABLE}"  # still enrolled

    revoked = revoke(folder, "st-mary")
    records.add_reply(Reply(server_round=2, phase="train", node_id=4242, error=UNAVAILABLE))
    row = records.rows[(2, "st-mary")]
    assert row["error"] == (f"train: revoked: hospital 'st-mary' was revoked at "
                            f"{revoked.revoked_at}; its node was unregistered")
    assert "Node Unavailable" not in row["error"]


def _run(tmp_path: Path, name: str, summary: dict) -> Run:
    return Run(path=tmp_path / name, config={}, metrics=pd.DataFrame(), summary=summary)


def test_the_report_names_a_test_set_only_where_there_is_one(tmp_path):
    deployed = _run(tmp_path, "deployed", {"published": {"round": 3}})
    simulated = _run(tmp_path, "simulated", {"federated": {"auc": 0.9}})
    assert "no test set" in held_out_sentence([deployed])
    assert "held out from every hospital" not in held_out_sentence([deployed])
    assert held_out_sentence([simulated]) == "the test set is held out from every hospital."
    assert "others are judged" in held_out_sentence([deployed, simulated])


def test_status_with_the_superlink_down_says_why_without_stray_braces():
    printed = json.dumps({"success": False, "error-message": "Connection refused\n"
                          "Is the SuperLink running?"}, indent=2)
    try:
        registry_nodes(printed)
    except SuperLinkError as err:
        message = str(err)
    assert "Connection refused Is the SuperLink running?" in message, message
    assert "}" not in message and "(})" not in message
    try:
        registry_nodes("Traceback ...\nConnectionError: refused\n}\n")
    except SuperLinkError as err:
        assert "ConnectionError: refused" in str(err) and "}" not in str(err)


def test_the_ledger_command_shows_whole_ids_and_counts_charges(tmp_path, capsys):
    from medfed_cli import main as cli

    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    dataset, run = "st-mary-hospital-chest-xray-2026-export", "3f1c0de5a1b2c3d4e5f60718293a4b5c"
    charge = Charge("dpsgd", 1.0, 0.1, 50, 1.0)
    for server_round in (1, 2, 3, 3):  # round 3 charged twice (trained again after a crash)
        ledger.record_round(dataset, run, server_round, [charge], 1e-5, "rdp", 50.0)
    (spend,) = run_spends(ledger)
    assert (spend.rounds, spend.charges) == (3, 4)
    cli.console.width = 80
    assert cli.main(["hospital", "ledger", "--db", str(path)]) == 0
    out = capsys.readouterr().out
    assert dataset in out and run in out
    assert "rounds 3, charges 4" in out and "a round was charged more than once" in out


def test_the_report_says_whether_the_run_was_secure_and_private(tmp_path):
    from simulations.report.page import safeguards

    summary = {"secure_aggregation": {"enabled": True}, "privacy_settings": {"dpsgd": True},
               "privacy": {"epsilon_max": 1.07, "target_epsilon": 1.0, "target_exceeded": True},
               "not_evaluated": [{"round": 1, "hospital": "st-mary", "reason": "x"}]}
    text = safeguards(_run(tmp_path, "deployed", summary))
    assert "secure aggregation on" in text and "differential privacy on" in text
    assert "largest epsilon at a hospital 1.07, target 1, above the study's target" in text
    assert "did not evaluate: st-mary" in text
    assert safeguards(_run(tmp_path, "old", {})) == ""
