"""One real Flower simulation: 2 hospitals, 2 rounds, a small subset of PneumoniaMNIST."""

import json
import math

import numpy as np
import psutil
import pytest
import torch
from peft import PeftModel

from models.adapters import adapter_state
from models.metrics import predict
from models.registry import build_base_model
from server.rounds import initial_model
from simulations.config import load_config
from simulations.runner import resolve, run_study

# A Flower simulation on Ray.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    config = load_config(None, {
        "run_dir": str(run_dir),
        "data": {"num_hospitals": 2, "partition": "iid", "max_train_examples": 240,
                 "max_test_examples": 120},
        "model": {"image_size": 32, "lora_r": 4, "lora_alpha": 8},
        "federation": {"rounds": 2, "min_hospitals": 2},
        "train": {"batch_size": 16, "local_epochs": 1, "lr": 1e-3},
    })
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    summary = run_study(config)
    children_after = {p.pid for p in psutil.Process().children(recursive=True)
                      if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}
    return resolve(config), summary, run_dir, children_after - children_before


def test_global_adapter_changed(study):
    config, _, run_dir, _ = study
    start = adapter_state(initial_model(config.model, config.train.seed))
    final = PeftModel.from_pretrained(build_base_model(config.model), run_dir / "adapter")
    final_state = adapter_state(final)
    assert set(final_state) == set(start)
    assert any(not torch.equal(start[k], final_state[k]) for k in start)


def test_metrics_are_complete_and_finite(study):
    config, summary, run_dir, _ = study
    import pandas as pd

    metrics = pd.read_csv(run_dir / "metrics.csv", dtype={"hospital": str})
    hospitals = metrics[metrics.hospital != "global"]
    assert sorted(hospitals["round"].unique()) == [1, 2]
    assert len(hospitals) == 2 * config.data.num_hospitals
    assert hospitals["error"].isna().all()
    assert np.isfinite(hospitals[["train_loss", "val_loss", "upload_bytes"]].to_numpy()).all()
    test_rows = metrics[metrics.hospital == "global"]
    assert list(test_rows["round"]) == [0, 1, 2]
    assert np.isfinite(test_rows[["test_loss", "test_auc", "test_accuracy"]].to_numpy()).all()
    for name in ("federated", "pooled", "local"):
        assert all(math.isfinite(summary[name][k]) for k in ("auc", "accuracy", "macro_f1"))
    per_round = summary["pooled"]["test_auc_per_round"]
    published = summary["pooled"]["published_round"]  # its best validation round
    assert len(per_round) == 2 and per_round[published - 1] == pytest.approx(
        summary["pooled"]["auc"])
    assert summary["bytes"]["full_model"] > 10 * summary["bytes"]["adapter"]
    assert json.loads((run_dir / "summary.json").read_text())["federated"] == summary["federated"]
    assert (run_dir / "config.toml").read_text().count("weights_sha256") == 1


def test_saved_adapter_reproduces_the_final_test_auc(study):
    config, summary, run_dir, _ = study
    from models.metrics import classification_metrics
    from simulations.sites import held_out_test_set

    model = PeftModel.from_pretrained(build_base_model(config.model), run_dir / "adapter")
    test = held_out_test_set(config.data, config.model.image_size, config.seed)
    probs = predict(model, test.images).softmax(dim=1).numpy()
    auc = classification_metrics(test.labels.numpy(), probs)["auc"]
    assert auc == pytest.approx(summary["federated"]["auc"], abs=1e-6)


def test_no_process_left_running(study):
    *_, leftover = study
    assert not leftover, f"processes left running: {leftover}"
