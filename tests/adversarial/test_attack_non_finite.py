"""Attack: switch a hospital's clipping off with a non-finite value in the adapter it sends.

The coordinator sets, in the global adapter, the head bias of a class the hospital has no
example of to ``-inf``. That class's probability is then 0 for every image, so the loss stays
finite and training never moves the row: the new adapter holds ``-inf`` where the global one
did, the update there is ``-inf - (-inf) = NaN``, its norm is NaN, and ``min(1, C / nan)``
used to read as "no clipping": the update left unclipped, with the normal noise and the normal
ledger charge. A NaN instead (under DP-SGD it makes every per-example gradient NaN, which
opacus' ``min(1, C / norm)`` does not bound either) is refused the same way.

Defence: every tensor the hospital receives is finite or refused before use, every update is
checked before release, clipping treats a non-finite norm as a refusal. The refusal is an error
reply naming the category (``non-finite: ...``); nothing is released and nothing is charged.
Real EfficientNet-Lite0, real PneumoniaMNIST images, the real ClientApp.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from client.app import build_client_app
from client.privacy_round import SitePrivacy
from client.site import SiteData
from models.adapters import adapter_state
from models.config import TrainConfig, to_config_record
from models.lora import build_lora_model
from privacy.config import DPConfig
from privacy.ledger import Ledger
from simulations.inprocess import coordinator_message

CLASSES = 3  # the hospital's images are labelled 0 and 1: class 2 it has never seen
CLIP = 0.01


@pytest.fixture(scope="module")
def site(pneumonia_small):
    train = pneumonia_small.splits["train"]
    rng = np.random.default_rng(3)
    return SiteData(train=train.subset(rng.choice(len(train), 32, replace=False)),
                    val=train.subset(rng.choice(len(train), 8, replace=False)))


@pytest.fixture
def model_config(small_model_config):
    return replace(small_model_config, num_classes=CLASSES)


def _hostile(model_config, value: float) -> ArrayRecord:
    """The global adapter with the head bias of the unseen class set to ``value``."""
    torch.manual_seed(0)
    state = adapter_state(build_lora_model(model_config))
    (bias,) = [k for k, v in state.items() if k.endswith("bias") and v.shape == (CLASSES,)]
    state[bias] = state[bias].clone()
    state[bias][CLASSES - 1] = value
    return ArrayRecord(state)


def _train(site, model_config, arrays: ArrayRecord, dp: DPConfig, ledger: Ledger):
    app = build_client_app(lambda context, image_size: site,
                           lambda context: SitePrivacy(ledger=ledger))
    context = Context(run_id=4, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    config = to_config_record(model_config, TrainConfig(local_steps=2, batch_size=16), dp)
    config["server-round"] = 1
    return app(coordinator_message("train", arrays, config), context)


def _assert_refused(reply, ledger: Ledger) -> None:
    assert reply.has_error(), "the hospital released an update computed from a non-finite value"
    assert reply.error.reason.startswith("non-finite: "), reply.error.reason
    assert not reply.has_content()
    assert ledger.rows() == []  # nothing released, nothing charged


UPDATE_DP = DPConfig(update_clip_norm=CLIP, update_noise_multiplier=1e-6, update_hospitals=1)
DPSGD = DPConfig(dpsgd=True, dp_noise_multiplier=1.0, dp_max_grad_norm=1.0, dp_run_rounds=1)


@pytest.mark.parametrize("value", [-math.inf, math.nan])
def test_client_level_dp_refuses_a_non_finite_adapter(tmp_path, site, model_config, value):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    arrays = _hostile(model_config, value)
    _assert_refused(_train(site, model_config, arrays, UPDATE_DP, ledger), ledger)


@pytest.mark.parametrize("value", [-math.inf, math.nan])
def test_dpsgd_refuses_a_non_finite_adapter(tmp_path, site, model_config, value):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    arrays = _hostile(model_config, value)
    _assert_refused(_train(site, model_config, arrays, DPSGD, ledger), ledger)


def test_the_same_round_with_a_finite_adapter_is_clipped_and_charged(tmp_path, site,
                                                                      model_config):
    """The control: a finite adapter is trained, its update clipped to ``C`` and charged."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    arrays = _hostile(model_config, -5.0)
    reply = _train(site, model_config, arrays, UPDATE_DP, ledger)
    assert not reply.has_error(), reply.error
    sent, got = arrays.to_torch_state_dict(), reply.content["arrays"].to_torch_state_dict()
    moved = math.sqrt(sum(float((got[k].double() - sent[k].double()).pow(2).sum())
                          for k in got))
    assert moved <= CLIP * 1.01
    assert len(ledger.rows()) == 1
