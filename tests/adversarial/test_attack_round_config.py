"""Attack: coordinator values of the wrong type or past any sane bound.

The coordinator writes every value of a round's config. Before the defence, a bounded number
sent as a string read as 0 and passed the run policy's bound (``"1000000"`` past
``max_rounds``), a float or bool stood in for a whole number, an infinite noise multiplier sent
the privacy accountant into an endless loop, a class count of 100,000 allocated a head of that
many rows before anything refused it, and a round the hospital had already answered was trained
and released again. Now one reader (``client.round_config``) types and bounds every value
before any handler reads it, so each of these is an error reply naming the key, before the
site's data is loaded or a model is built. Real EfficientNet-Lite0, real PneumoniaMNIST
images, a real run policy file, the real ClientApp.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

import client.app
import privacy.accounting
from client.app import build_client_app
from client.privacy_round import SitePrivacy
from client.run_policy import load_run_policy, run_refusal
from client.site import SiteData
from models.adapters import adapter_state
from models.config import ModelConfig, TrainConfig, to_config_record
from models.lora import build_lora_model
from privacy.config import DPConfig
from privacy.ledger import Ledger
from simulations.inprocess import coordinator_message

TASK = "pneumonia-cxr"


@pytest.fixture(scope="module")
def arrays():
    torch.manual_seed(0)
    config = ModelConfig(image_size=32, num_classes=2, lora_r=4, lora_alpha=8)
    return ArrayRecord(adapter_state(build_lora_model(config, verify=False)))


@pytest.fixture
def hospital(tmp_path, pneumonia_small, monkeypatch):
    """A hospital with a run policy (max_rounds 100), a ledger and real images labelled 0/1;
    ``loads`` and ``builds`` record every site load and every model built."""
    policy = tmp_path / "run-policy.toml"
    policy.write_text('allowed_apps = ["medfed/medfed-app==1.0.0"]\n'
                      'allowed_backbones = ["efficientnet-lite0-imagenet"]\n'
                      f'allowed_tasks = ["{TASK}"]\nmin_hospitals = 2\n')
    train = pneumonia_small.splits["train"]
    rng = np.random.default_rng(0)
    site = SiteData(train=train.subset(rng.choice(len(train), 32, replace=False)),
                    val=train.subset(rng.choice(len(train), 16, replace=False)))
    loads, builds = [], []
    build = client.app.lora_model_for

    def counted_build(model_config):
        builds.append(model_config.num_classes)
        if model_config.num_classes > 1000:  # the attack's allocation: never made in a test
            raise AssertionError(f"a {model_config.num_classes}-class head was allocated")
        return build(model_config)

    monkeypatch.setattr(client.app, "lora_model_for", counted_build)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    app = build_client_app(lambda context, image_size: loads.append(image_size) or site,
                           lambda context: SitePrivacy(ledger=ledger))
    context = Context(run_id=9, node_id=3, state=RecordDict(), run_config={}, node_config={
        "partition-id": 0, "run-policy": str(policy)})
    return app, context, loads, builds, ledger


def _config(model_config: ModelConfig, dp: DPConfig | None = None, **values) -> ConfigRecord:
    config = to_config_record(model_config, TrainConfig(local_steps=2, batch_size=8),
                              *([dp] if dp else []))
    config["server-round"], config["min-hospitals"], config["task"] = 1, 2, TASK
    for key, value in values.items():
        config[key] = value
    return config


def _send(hospital, arrays, config, kind="train"):
    app, context, *_ = hospital
    return app(coordinator_message(kind, arrays, config, run_id=9, group_id="1"), context)


def _assert_refused_before_work(hospital, reply, words: str) -> None:
    _, _, loads, builds, ledger = hospital
    assert reply.has_error(), "the hospital answered a round it should have refused"
    assert words in reply.error.reason, reply.error.reason
    assert not reply.has_content()
    assert loads == [] and builds == []  # no data loaded, no model built
    assert ledger.rows() == []


def test_a_round_number_sent_as_a_string_does_not_pass_max_rounds(hospital, arrays,
                                                                  small_model_config):
    config = _config(small_model_config)
    config["server-round"] = "1000000"
    reply = _send(hospital, arrays, config)
    _assert_refused_before_work(hospital, reply, "round-config: server-round = '1000000'")
    # The run policy's own check refuses it too, rather than reading it as 0.
    policy = load_run_policy(Path(hospital[1].node_config["run-policy"]))
    assert "not a whole number" in run_refusal(policy, config, "train")


def test_an_answered_round_replayed_is_refused(hospital, arrays, small_model_config):
    _, _, loads, _, _ = hospital
    first = _send(hospital, arrays, _config(small_model_config))
    assert not first.has_error(), first.error
    for server_round in (1, 0 + 1):  # the same round again, as sent and re-sent
        again = _send(hospital, arrays, _config(small_model_config, **{
            "server-round": server_round}))
        assert again.has_error() and "round-replay" in again.error.reason, again.error
        assert not again.has_content()
    assert len(loads) == 1  # the replay never reached the data
    later = _send(hospital, arrays, _config(small_model_config, **{"server-round": 2}))
    assert not later.has_error(), later.error


WRONG_TYPES = [
    ("server-round", 1.0), ("server-round", True), ("lora-r", True), ("lora-r", 4.0),
    ("batch-size", "8"), ("local-steps", 2.5), ("image-size", "32"), ("min-hospitals", True),
    ("logit-adjust", 1), ("hetlora-ranks", [2.0]), ("hetlora-ranks", ["2"]),
    ("hetlora-ranks", [True]), ("lr", "0.002"), ("seed", 1.5), ("num-classes", 2.0),
]


@pytest.mark.parametrize("key, value", WRONG_TYPES)
def test_a_bool_float_or_string_where_a_whole_number_is_expected_is_refused(
        hospital, arrays, small_model_config, key, value):
    reply = _send(hospital, arrays, _config(small_model_config, **{key: value}))
    _assert_refused_before_work(hospital, reply, f"round-config: {key}")


@pytest.mark.parametrize("dp", [
    DPConfig(dpsgd=True, dp_noise_multiplier=math.inf, dp_run_rounds=1),
    DPConfig(update_clip_norm=0.1, update_noise_multiplier=math.inf, update_hospitals=1),
    DPConfig(dpsgd=True, dp_noise_multiplier=1e9, dp_run_rounds=1),
], ids=["dpsgd-inf", "update-inf", "dpsgd-1e9"])
def test_an_infinite_noise_multiplier_is_refused_before_the_accountant(
        hospital, arrays, small_model_config, monkeypatch, dp):
    def never(*args, **kwargs):  # the accountant loops forever on an infinite multiplier
        raise AssertionError("the accountant was handed the coordinator's noise multiplier")

    monkeypatch.setattr(privacy.accounting, "create_accountant", never)
    reply = _send(hospital, arrays, _config(small_model_config, dp))
    _assert_refused_before_work(hospital, reply, "round-config: ")
    assert "noise-multiplier" in reply.error.reason


def test_a_huge_class_count_is_refused_before_a_head_is_allocated(hospital, arrays,
                                                                  small_model_config):
    reply = _send(hospital, arrays, _config(replace(small_model_config, num_classes=100_000)))
    _assert_refused_before_work(hospital, reply, "round-config: num-classes = 100000")


def test_a_class_the_hospital_did_not_declare_is_refused_unless_its_policy_allows(
        hospital, arrays, small_model_config):
    app, context, loads, builds, _ = hospital
    three = replace(small_model_config, num_classes=3)
    reply = _send(hospital, arrays, _config(three))
    assert reply.has_error() and "max_extra_classes" in reply.error.reason, reply.error
    assert builds == []  # refused before the model (and its head) was built
    policy = context.node_config["run-policy"]
    with open(policy, "a") as file:
        file.write("max_extra_classes = 1\n")
    torch.manual_seed(0)
    three_arrays = ArrayRecord(adapter_state(build_lora_model(three, verify=False)))
    reply = _send(hospital, three_arrays, _config(three))
    assert not reply.has_error(), reply.error


OUT_OF_BOUNDS = [
    # client-level DP: the noise share is z C / sqrt(n); a huge n makes it vanish
    ("update-hospitals", 10**9), ("update-clip-norm", math.inf), ("update-clip-norm", -1.0),
    ("update-noise-multiplier", math.nan),
    # DP-SGD
    ("dp-max-grad-norm", math.inf), ("dp-max-grad-norm", 0.0), ("dp-delta", 1e-300),
    ("dp-delta", 0.5), ("dp-target-epsilon", math.inf), ("dp-lr", 1e6),
    ("dp-augmentations", 10**6), ("dp-run-rounds", 10**12),
    # local training
    ("lr", 1e6), ("lr", math.inf), ("lr-decay", 10.0), ("proximal-mu", math.inf),
    ("weight-decay", math.nan), ("seed", -1), ("seed", 2**70), ("local-steps", 10**12),
    ("lora-r", 10**6), ("image-size", 10**6), ("lora-dropout", math.nan),
    # names and modes
    ("trainable", "everything"), ("adapter-exchange", "none"), ("hetlora", "yes"),
    ("hetlora-ranks", [0]), ("hetlora-ranks", [5]), ("classes", ["a", "A"]),
    ("classes", ["a", "b", "c"]), ("task", "x" * 10_000), ("lora-targets", "layer4"),
]


@pytest.mark.parametrize("key, value", OUT_OF_BOUNDS)
def test_an_out_of_bounds_setting_is_refused_before_any_work(hospital, arrays,
                                                            small_model_config, key, value):
    dp = DPConfig(update_clip_norm=0.1, update_noise_multiplier=1.0, update_hospitals=2)
    if key.startswith("dp-"):
        dp = DPConfig(dpsgd=True, dp_noise_multiplier=1.0, dp_run_rounds=1)
    reply = _send(hospital, arrays, _config(small_model_config, dp, **{key: value}))
    _assert_refused_before_work(hospital, reply, f"round-config: {key}")


def test_the_same_settings_within_bounds_are_answered(hospital, arrays, small_model_config):
    """The control: client-level DP within every bound trains and is charged once."""
    _, _, _, _, ledger = hospital
    dp = DPConfig(update_clip_norm=0.1, update_noise_multiplier=1.0, update_hospitals=2)
    reply = _send(hospital, arrays, _config(small_model_config, dp, classes=["a", "b"]))
    assert not reply.has_error(), reply.error
    assert len(ledger.rows()) == 1


def test_a_coordinator_cannot_set_the_secure_aggregation_sum_size(hospital, arrays,
                                                                 small_model_config):
    """``update-min-sum-size`` is the hospital's own: a coordinator's value in a plain round
    does not lower the ledger's charge (it is charged as the hospital's own share)."""
    _, _, _, _, ledger = hospital
    dp = DPConfig(update_clip_norm=0.1, update_noise_multiplier=1.0, update_hospitals=4)
    reply = _send(hospital, arrays, _config(small_model_config, dp,
                                            **{"update-min-sum-size": 4}))
    assert not reply.has_error(), reply.error
    (row,) = ledger.rows()
    assert row.noise_multiplier == pytest.approx(1.0 / math.sqrt(4))
