"""A hospital takes part only in the study tasks its approvals cover.

Real hospitals (PneumoniaMNIST partitions, the ClientApp with a run policy in its node config)
through the coordinator's round loop in process: the study's ``federation.task`` reaches every
training and evaluation message, and a hospital refuses a task its policy does not list.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from client.app import build_client_app
from models.config import ModelConfig, TrainConfig
from models.registry import weights_sha256
from server.config import FederationConfig
from server.records import RunRecords
from server.rounds import FederationError, run_federation
from simulations.config import DataConfig
from simulations.inprocess import InProcessGrid
from simulations.sites import SimulatedSiteLoader
from simulations.sites import held_out_test_set as central_test_set

NODES = [2**63 + 17 * k + 5 for k in range(3)]
POLICY = ('allowed_backbones = ["efficientnet-lite0-imagenet"]\n'
          'allowed_tasks = ["pneumonia-cxr"]\nmin_hospitals = 3\n')


def _federate(tmp_path, task: str) -> RunRecords:
    data = DataConfig(num_hospitals=3, max_train_examples=120, max_test_examples=64)
    policy = tmp_path / "run-policy.toml"
    policy.write_text(POLICY)
    grid = InProcessGrid(build_client_app(SimulatedSiteLoader(data, 0)),
                         {NODES[k]: {"partition-id": k, "run-policy": str(policy)}
                          for k in range(3)})
    model = ModelConfig(image_size=32, lora_r=4, lora_alpha=8,
                        weights_sha256=weights_sha256("efficientnet-lite0-imagenet"))
    federation = FederationConfig(rounds=1, min_hospitals=3, fraction_evaluate=1.0, task=task)
    records = RunRecords(tmp_path / f"run-{task}")
    run_federation(grid, federation, model, replace(TrainConfig(), local_steps=2),
                   central_test_set(data, 32, 0), records)
    return records


def test_hospitals_train_and_evaluate_for_an_allowed_task(tmp_path):
    records = _federate(tmp_path, "pneumonia-cxr")
    rows = records.train_rows()
    assert len(rows) == 3 and not any(r.get("error") for r in rows), rows
    # Each hospital trained and evaluated: the evaluate messages declare the task (and the
    # aggregate size) too, or the policy would have refused them.
    assert all(r["num_examples"] > 0 and r["val_auc"] is not None for r in rows), rows


def test_hospitals_refuse_a_task_their_policy_does_not_list(tmp_path):
    with pytest.raises(FederationError) as failed:
        _federate(tmp_path, "bone-age")
    assert "metrics.csv" in str(failed.value)
    metrics = (tmp_path / "run-bone-age" / "metrics.csv").read_text()
    assert metrics.count("task 'bone-age' is not allowed") == 3, metrics
