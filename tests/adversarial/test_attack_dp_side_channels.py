"""Attack: learn about patients from what leaves beside the noised adapter, or from a ledger
that under-counts.

- the raw training loss in a private round's reply (labels were recovered from it);
- a delta large enough to publish an example outright (above 1/N, or above the policy's);
- a ledger that composes hospital-level update noise as if it protected each example.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from client.app import build_client_app
from client.audit import read_audit_log
from client.privacy_round import SitePrivacy
from client.site import SiteData
from models.adapters import adapter_state
from models.config import TrainConfig, to_config_record
from models.lora import build_lora_model
from privacy.accounting import epsilon
from privacy.config import DPConfig
from privacy.ledger import Charge, Ledger
from privacy.policy import SitePolicy
from privacy.update_dp import update_charge
from simulations.inprocess import coordinator_message


@pytest.fixture(scope="module")
def site(pneumonia_small):
    train = pneumonia_small.splits["train"]
    rng = np.random.default_rng(9)
    return SiteData(train=train.subset(rng.choice(len(train), 32, replace=False)),
                    val=train.subset(rng.choice(len(train), 8, replace=False)))


def _reply(site, model_config, dp: DPConfig, privacy: SitePrivacy, node_config: dict):
    app = build_client_app(lambda context, image_size: site, lambda context: privacy)
    context = Context(run_id=3, node_id=7, node_config={"partition-id": 0} | node_config,
                      state=RecordDict(), run_config={})
    torch.manual_seed(0)
    arrays = ArrayRecord(adapter_state(build_lora_model(model_config)))
    config = to_config_record(model_config, TrainConfig(local_steps=1, batch_size=16), dp)
    config["server-round"] = 1
    return app(coordinator_message("train", arrays, config), context)


@pytest.mark.parametrize("mechanism", ["dpsgd", "update-dp", "site-policy"])
def test_private_round_withholds_the_training_loss(tmp_path, site, small_model_config,
                                                   mechanism):
    log = tmp_path / "egress.jsonl"
    dp = {"dpsgd": DPConfig(dpsgd=True, dp_noise_multiplier=1.0),
          "update-dp": DPConfig(update_clip_norm=0.1, update_noise_multiplier=1.0,
                                update_hospitals=1),
          "site-policy": DPConfig(update_clip_norm=0.1, update_noise_multiplier=1.0,
                                  update_hospitals=1)}[mechanism]
    privacy = SitePrivacy()
    if mechanism == "site-policy":
        privacy = SitePrivacy(policy=SitePolicy(max_epsilon=50.0),
                              ledger=Ledger(tmp_path / "ledger.sqlite"), dataset_id="d")
    reply = _reply(site, small_model_config, dp, privacy, {"audit-log": str(log)})
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = dict(reply.content["metrics"].items())
    assert "train-loss" not in metrics and "dp-epsilon" in metrics
    assert set(metrics) <= {"num-examples", "hospital-id", "dp-epsilon", "dp-delta",
                            "update-weight"}
    [entry] = read_audit_log(log)
    assert "train-loss" not in entry["metrics"]["metrics"]
    # The control: a round with no DP and no policy still reports its loss.
    plain = _reply(site, small_model_config, DPConfig(), SitePrivacy(), {})
    assert "train-loss" in plain.content["metrics"]


def test_delta_above_one_over_n_is_refused(site, small_model_config):
    dp = DPConfig(update_clip_norm=0.1, update_noise_multiplier=1.0, update_hospitals=1,
                  dp_delta=1 / 20)  # N = 32 examples: 1/N = 0.031
    reply = _reply(site, small_model_config, dp, SitePrivacy(), {})
    assert reply.has_error() and "above 1/N" in reply.error.reason


def test_delta_above_the_policy_is_refused(tmp_path, site, small_model_config):
    privacy = SitePrivacy(policy=SitePolicy(max_epsilon=50.0, delta=1e-6),
                          ledger=Ledger(tmp_path / "ledger.sqlite"), dataset_id="d")
    dp = DPConfig(update_clip_norm=0.1, update_noise_multiplier=1.0, update_hospitals=1,
                  dp_delta=1e-5)
    reply = _reply(site, small_model_config, dp, privacy, {})
    assert reply.has_error() and "above the site policy's" in reply.error.reason
    assert privacy.ledger.rows() == []
    # A policy whose own delta is above 1/N cannot be used either.
    loose = SitePrivacy(policy=SitePolicy(max_epsilon=50.0, delta=0.1),
                        ledger=Ledger(tmp_path / "loose.sqlite"), dataset_id="d")
    reply = _reply(site, small_model_config, DPConfig(update_clip_norm=0.1,
                   update_noise_multiplier=1.0, update_hospitals=1, dp_delta=0.05), loose, {})
    assert reply.has_error() and "above 1/N" in reply.error.reason


def test_update_noise_is_charged_at_sensitivity_two_c_per_example(tmp_path):
    """One example moves a clipped update anywhere in the ball of radius C: up to 2C. The
    ledger's example-level budget must charge update noise z as z / 2, composed with DP-SGD."""
    z, hospitals = 3.0, 4
    update = update_charge(0.1, z, hospitals)
    assert update.unit == "hospital" and update.noise_multiplier == pytest.approx(z / 2)
    dpsgd = Charge("dpsgd", 1.1, 0.25, 8, 1.0)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    total = ledger.record_round("d", "r", 1, [dpsgd, update], 1e-5, "rdp", math.inf)
    right = epsilon([(1.1, 0.25, 8), (z / math.sqrt(hospitals) / 2, 1.0, 1)], 1e-5, "rdp")
    wrong = epsilon([(1.1, 0.25, 8), (z / math.sqrt(hospitals), 1.0, 1)], 1e-5, "rdp")
    assert total == pytest.approx(right) and total > 1.2 * wrong
    assert [r.unit for r in ledger.rows()] == ["example", "hospital"]
    assert ledger.run_epsilon("d", "r") == (pytest.approx(right), 1e-5)
