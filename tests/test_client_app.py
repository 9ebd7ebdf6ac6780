"""The hospital's ClientApp, called in-process with built Messages (no Flower runtime)."""


import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict

from client.app import build_client_app
from client.privacy_round import site_privacy_from_node_config
from models.adapters import adapter_state
from models.config import ModelConfig, TrainConfig, to_config_record
from models.lora import build_lora_model
from simulations.attack import UpdateAttack, attacked_client_app
from simulations.inprocess import coordinator_message


def _message(kind: str, arrays: ArrayRecord, config) -> Message:
    return coordinator_message(kind, arrays, config)


@pytest.fixture
def app(site):
    return build_client_app(lambda context, image_size: site)


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 3}, state=RecordDict(),
                   run_config={})


def _wire(config: ModelConfig):
    torch.manual_seed(0)
    arrays = ArrayRecord(adapter_state(build_lora_model(config)))
    record = to_config_record(config, TrainConfig(local_epochs=1, batch_size=16, lr=1e-3))
    record["server-round"] = 1
    return arrays, record


def test_train_returns_a_changed_adapter_and_nothing_else(app, small_model_config, site):
    arrays, config = _wire(small_model_config)
    reply = app(_message("train", arrays, config), _context())
    assert not reply.has_error()
    assert set(reply.content.array_records) == {"arrays"}
    assert set(reply.content.config_records) == set()
    new = reply.content["arrays"]
    assert set(new) == set(arrays)
    changed = [k for k in arrays if not np.array_equal(arrays[k].numpy(), new[k].numpy())]
    assert changed, "training changed no adapter tensor"
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == len(site.train)
    assert metrics["hospital-id"] == 3
    assert np.isfinite(metrics["train-loss"])


def test_evaluate_reports_validation_metrics(app, small_model_config, site):
    arrays, config = _wire(small_model_config)
    reply = app(_message("evaluate", arrays, config), _context())
    metrics = reply.content["metrics"]
    assert set(reply.content.array_records) == set()
    assert metrics["num-examples"] == len(site.val)
    assert 0.0 <= metrics["val-accuracy"] <= 1.0 and np.isfinite(metrics["val-loss"])


def test_hospital_refuses_other_base_weights(app, small_model_config):
    arrays, config = _wire(small_model_config)
    config["weights-sha256"] = "f" * 64
    # Answered as an error reply of category model-weights naming the pinned hash (audited,
    # not raised); the hash of a public model is no patient information.
    reply = app(_message("train", arrays, config), _context())
    assert reply.has_error() and reply.error.reason.startswith("model-weights:")
    assert "f" * 64 in reply.error.reason


def test_hostile_hospital_flips_its_update_and_inflates_its_weight(app, small_model_config,
                                                                    site):
    arrays, config = _wire(small_model_config)
    honest = app(_message("train", arrays, config), _context()).content
    attack = UpdateAttack(hospital=3, factor=-1, claimed_examples=5000)
    hostile_app = attacked_client_app(lambda context, image_size: site,
                                      site_privacy_from_node_config, attack)
    hostile = hostile_app(_message("train", arrays, config), _context()).content
    assert hostile["metrics"]["num-examples"] == 5000
    for name in arrays:
        start, update = arrays[name].numpy(), honest["arrays"][name].numpy() - arrays[name].numpy()
        np.testing.assert_allclose(hostile["arrays"][name].numpy(), start - update, atol=1e-6)
    # Every other hospital is left alone.
    other = Context(run_id=1, node_id=8, node_config={"partition-id": 0}, state=RecordDict(),
                    run_config={})
    bystander = hostile_app(_message("train", arrays, config), other).content
    assert bystander["metrics"]["num-examples"] == len(site.train)
