"""An evaluation refusal never voids a round's training (issue #34, item 1).

Three real hospitals (PneumoniaMNIST partitions, the ClientApp with a run policy and a privacy
policy in its node config) through the coordinator's round loop in process. One hospital's run
policy asks for more validation examples than it holds (``min_evaluation_examples``), so it
refuses every evaluation; it still trains, the run still publishes its adapter, and the records
say which hospital did not evaluate and why.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace

from client.app import build_client_app
from models.config import ModelConfig, TrainConfig
from models.registry import weights_sha256
from server.config import FederationConfig
from server.records import RunRecords
from server.rounds import run_federation, run_summary
from server.study import Study
from simulations.config import DataConfig
from simulations.inprocess import InProcessGrid
from simulations.sites import SimulatedSiteLoader

NODES = [2**63 + 19 * k + 3 for k in range(3)]
TASK = "pneumonia-cxr"


def _node_config(folder, min_evaluation_examples: int) -> dict[str, object]:
    """A hospital's node config: its own run policy, privacy policy, ledger and audit log."""
    folder.mkdir()
    (folder / "run-policy.toml").write_text(
        'allowed_backbones = ["efficientnet-lite0-imagenet"]\n'
        f'allowed_tasks = ["{TASK}"]\nmin_hospitals = 3\n'
        f"min_evaluation_examples = {min_evaluation_examples}\n")
    (folder / "privacy-policy.toml").write_text(
        "max_epsilon = 8.0\ndelta = 1e-5\nrequire_dp = false\n")
    return {"run-policy": str(folder / "run-policy.toml"),
            "privacy-policy": str(folder / "privacy-policy.toml"),
            "privacy-ledger": str(folder / "ledger.sqlite"),
            "audit-log": str(folder / "audit.jsonl"), "dataset-id": f"{folder.name}-cxr"}


def test_a_hospital_that_refuses_evaluation_still_trains_and_the_run_publishes(tmp_path):
    data = DataConfig(num_hospitals=3, max_train_examples=120, max_test_examples=64)
    configs = {}
    for k, node in enumerate(NODES):
        # Hospital 0's validation split is far below its own evaluation minimum.
        minimum = 10_000 if k == 0 else 1
        configs[node] = {"partition-id": k} | _node_config(tmp_path / f"h{k}", minimum)
    grid = InProcessGrid(build_client_app(SimulatedSiteLoader(data, 0)), configs)
    model = ModelConfig(image_size=32, lora_r=4, lora_alpha=8,
                        weights_sha256=weights_sha256("efficientnet-lite0-imagenet"))
    train = replace(TrainConfig(), local_steps=2)
    federation = FederationConfig(rounds=2, min_hospitals=3, fraction_evaluate=1.0, task=TASK)
    records = RunRecords(tmp_path / "run")

    outcome = run_federation(grid, federation, model, train, None, records)

    run_dir = tmp_path / "run"
    assert (run_dir / "adapter").is_dir() and outcome.published_round in (1, 2)
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["hospital"] != "global"]
    assert len(rows) == 6, rows
    # Every hospital trained both rounds: its update counted.
    assert all(int(r["num_examples"]) > 0 for r in rows), rows
    refused = [r for r in rows if r["evaluation_error"]]
    assert {r["hospital"] for r in refused} == {"0"} and len(refused) == 2, rows
    assert all("min_evaluation_examples" in r["evaluation_error"] for r in refused)
    assert all(r["val_auc"] for r in rows if r["hospital"] != "0"), rows

    summary = run_summary(records, Study(model=model, train=train, federation=federation),
                          outcome)
    json.dumps(summary)  # what summary.json holds
    assert [(n["round"], n["hospital"]) for n in summary["not_evaluated"]] == [(1, "0"),
                                                                              (2, "0")]
    assert "min_evaluation_examples" in summary["not_evaluated"][0]["reason"]
    assert summary["secure_aggregation"]["enabled"] is False
    assert set(summary["validation_per_hospital"]) == {"1", "2"}


def test_a_run_refused_for_a_policy_resumes_once_the_policy_changed(tmp_path):
    """Hospital 2's run policy answers no round past 1 (``max_rounds``): round 2 has too few
    updates, the run ends saying what to do, and after the hospital changed its policy the same
    call resumes after round 1 and publishes."""
    from server.rounds import FederationError

    data = DataConfig(num_hospitals=3, max_train_examples=120, max_test_examples=64)
    configs = {node: {"partition-id": k} | _node_config(tmp_path / f"h{k}", 1)
               for k, node in enumerate(NODES)}
    policy = tmp_path / "h2" / "run-policy.toml"
    policy.write_text(policy.read_text() + "max_rounds = 1\n")
    model = ModelConfig(image_size=32, lora_r=4, lora_alpha=8,
                        weights_sha256=weights_sha256("efficientnet-lite0-imagenet"))
    train = replace(TrainConfig(), local_steps=2)
    federation = FederationConfig(rounds=2, min_hospitals=3, fraction_evaluate=0.0, task=TASK)

    def run():
        grid = InProcessGrid(build_client_app(SimulatedSiteLoader(data, 0)), configs)
        records = RunRecords(tmp_path / "run")
        return run_federation(grid, federation, model, train, None, records), records

    try:
        run()
        raise AssertionError("round 2 should have had too few updates")
    except FederationError as err:
        message = str(err)
    assert "round 2 got 2 valid updates, needs 3" in message and "'max_rounds'" in message
    assert "start the same study again with the same run directory: it resumes after round 1" \
        in message

    policy.write_text(policy.read_text().replace("max_rounds = 1\n", "max_rounds = 10\n"))
    outcome, records = run()
    assert (tmp_path / "run" / "adapter").is_dir() and outcome.published_round == 2
    assert sorted(r["hospital"] for r in records.train_rows() if r["round"] == 2) == \
        ["0", "1", "2"]
