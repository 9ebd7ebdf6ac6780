"""The coordinator's per-round checkpoint: a run killed after round 1 and started again with the
same settings ends with the same adapter as an uninterrupted run."""

import numpy as np
import pytest
import torch
from loopback import LoopbackGrid, server_identity

from client.app import build_client_app
from client.site import SiteData
from models.adapters import adapter_state
from models.config import TrainConfig
from server.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint
from server.config import FederationConfig
from server.records import RunRecords
from server.rounds import run_federation


class Crash(RuntimeError):
    """Stands for the coordinator being killed."""


@pytest.fixture(scope="module")
def sites(pneumonia_small):
    train = pneumonia_small.splits["train"]
    order = np.random.default_rng(1).permutation(len(train))
    return [SiteData(train=train.subset(order[i * 64:i * 64 + 48]),
                     val=train.subset(order[i * 64 + 48:i * 64 + 64])) for i in range(2)]


@pytest.fixture(scope="module")
def test_set(pneumonia_small):
    return pneumonia_small.splits["test"].subset(np.arange(48))


def _run(run_dir, sites, test_set, model_config, on_round=None, strategy="fedavg"):
    app = build_client_app(lambda context, size: sites[int(context.node_config["partition-id"])])
    grid = LoopbackGrid(app, [{"partition-id": 0}, {"partition-id": 1}])
    with server_identity():
        return run_federation(
            grid, FederationConfig(rounds=2, min_hospitals=2, round_timeout_s=60,
                                   strategy=strategy),
            model_config, TrainConfig(batch_size=16, local_steps=3, lr=3e-3, lr_decay=0.5, seed=3),
            test_set, RunRecords(run_dir), on_round=on_round)


# fedadam: the server optimiser's moments (Flower's FedOpt m_t, v_t) are in the checkpoint.
@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_killed_after_round_one_resumes_to_the_same_adapter(tmp_path, sites, test_set,
                                                            small_model_config, strategy):
    whole = adapter_state(_run(tmp_path / "whole", sites, test_set, small_model_config,
                               strategy=strategy).model)
    assert not (tmp_path / "whole" / CHECKPOINT_FILE).exists()  # a finished run keeps none

    def kill_after_round_one(server_round, metrics):
        if server_round == 1:
            raise Crash()

    with pytest.raises(Crash):
        _run(tmp_path / "crashed", sites, test_set, small_model_config, kill_after_round_one,
             strategy)
    assert (tmp_path / "crashed" / CHECKPOINT_FILE).exists()
    if strategy == "fedadam":
        state = load_checkpoint(tmp_path / "crashed", _fingerprint_of(tmp_path / "crashed"))
        assert {k.split("/")[0] for k in state.strategy_state} == {"m_t", "v_t"}
    with pytest.raises(CheckpointError, match="other settings"):
        load_checkpoint(tmp_path / "crashed", "a run with other settings")
    seen = []
    resumed = _run(tmp_path / "crashed", sites, test_set, small_model_config,
                   lambda r, m: seen.append(r), strategy)
    assert seen == [2]  # only round 2 ran again
    final = adapter_state(resumed.model)
    assert set(final) == set(whole)
    for name in whole:
        torch.testing.assert_close(final[name], whole[name], rtol=0, atol=1e-6)
    # The records of round 1 survived the crash: metrics.csv lists both rounds.
    import pandas as pd

    metrics = pd.read_csv(tmp_path / "crashed" / "metrics.csv", dtype={"hospital": str})
    trained = metrics[metrics.hospital != "global"]
    assert sorted(trained["round"].unique()) == [1, 2] and len(trained) == 4



def _fingerprint_of(run_dir):
    from safetensors import safe_open

    with safe_open(str(run_dir / CHECKPOINT_FILE), framework="pt") as handle:
        return handle.metadata()["settings_fingerprint"]


def test_status_reports_runs_and_their_last_round(tmp_path):
    from flwr.app import ArrayRecord

    from server.checkpoint import save_checkpoint
    from server.consortium import init_consortium
    from server.status import run_statuses

    init_consortium(tmp_path, "t")
    crashed, done = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    crashed.mkdir()
    save_checkpoint(crashed, 3, ArrayRecord({"w": torch.ones(2)}), "f", [])
    (crashed / "metrics.csv").write_text("round,hospital,error\n1,0,\n2,1,train: timeout\n")
    (done / "adapter").mkdir(parents=True)
    assert [(r.state, r.last_round, r.last_error) for r in run_statuses(tmp_path)] == [
        ("running or crashed", 3, "round 2 hospital 1: train: timeout"), ("finished", None, "")]
