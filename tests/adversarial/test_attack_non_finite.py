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


def test_evaluation_refuses_a_non_finite_adapter(tmp_path, site, model_config):
    """Scored with a ``-inf`` bias the metrics would look normal: refused all the same."""
    app = build_client_app(lambda context, image_size: site)
    context = Context(run_id=4, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    config = to_config_record(model_config, TrainConfig(local_steps=2, batch_size=16))
    config["server-round"] = 1
    reply = app(coordinator_message("evaluate", _hostile(model_config, -math.inf), config),
                context)
    assert reply.has_error() and reply.error.reason.startswith("non-finite: "), reply
    assert not reply.has_content()


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


# --- each defence on its own, below the ClientApp ----------------------------------------------
def test_clipping_refuses_a_non_finite_norm_instead_of_not_clipping():
    """``min(1, C / nan)`` is 1: the old clipping let a NaN-norm update through unclipped."""
    from models.finite import NonFiniteError
    from privacy.noise import SecureNoise
    from privacy.update_dp import clip_and_noise

    reference = {"head": torch.tensor([0.0, 0.0, -math.inf]), "lora": torch.zeros(4)}
    new = {"head": torch.tensor([50.0, -50.0, -math.inf]), "lora": torch.full((4,), 50.0)}
    with pytest.raises(NonFiniteError, match="not finite|non-finite"):
        clip_and_noise(new, reference, 0.1, 1.0, 1, SecureNoise())
    finite = {"head": torch.zeros(3), "lora": torch.zeros(4)}
    for clip, z in ((math.nan, 1.0), (0.1, math.inf), (-0.1, 1.0), (0.1, -1.0)):
        with pytest.raises(ValueError):
            clip_and_noise(finite, finite, clip, z, 1, SecureNoise())


def test_dpsgd_refuses_a_clipped_sum_that_is_not_finite():
    """opacus clips by ``min(1, C / (norm + 1e-6))``: NaN for a NaN gradient, not a bound."""
    from models.finite import NonFiniteError
    from privacy.dpsgd import use_noise_source
    from privacy.noise import SecureNoise

    class Optimizer:  # what add_noise reads of an opacus DPOptimizer
        noise_multiplier, max_grad_norm = 1.0, 1.0

    param = torch.nn.Parameter(torch.zeros(3))
    param.summed_grad = torch.tensor([0.1, math.nan, 0.2])
    optimizer = Optimizer()
    optimizer.params = [param]
    use_noise_source(optimizer, SecureNoise())
    with pytest.raises(NonFiniteError):
        optimizer.add_noise()
    assert param.grad is None  # no step can be taken


def test_secure_aggregation_refuses_to_quantise_a_nan():
    """A NaN has no integer code: cast to uint32 it would become an arbitrary masked value."""
    from models.finite import NonFiniteError
    from privacy.secagg.encoding import quantize

    rng = np.random.default_rng(0)
    with pytest.raises(NonFiniteError):
        quantize(np.array([0.1, math.nan, -0.2]), 1.0, 20, rng)
    for clipping_range in (math.inf, math.nan, 0.0):
        with pytest.raises(ValueError):
            quantize(np.array([0.1]), clipping_range, 20, rng)


@pytest.mark.parametrize("max_weight, bits, modulus", [
    (math.nan, 20, 32), (math.inf, 20, 32), (0.0, 20, 32), (-1.0, 20, 32), ("1", 20, 32),
    (1.0, "20", 32), (1.0, 20, 40), (1.0, True, 32), (1.0, 32, 32), (1.0, 20.0, 32),
])
def test_secure_aggregation_refuses_hostile_masking_parameters(max_weight, bits, modulus):
    """A NaN max-weight made every coordinate NaN; a modulus past 32 bits does not fit."""
    from client.secure_aggregation import masking_bits, weight_ratio
    from models.finite import NonFiniteError
    from privacy.secagg import SecAggError

    with pytest.raises((SecAggError, NonFiniteError)):  # a refused stage either way
        weight_ratio(1.0, max_weight)
        masking_bits(bits, modulus)


def test_a_non_finite_feature_centre_is_refused(small_model_config):
    """The CT head's centre travels with the adapter; a NaN there would reach every logit."""
    from models.feature_centre import FeatureCentre, recentred
    from models.finite import NonFiniteError

    centre = FeatureCentre(4)
    with pytest.raises(NonFiniteError):
        centre.load_state_dict({"mean": torch.tensor([0.0, math.nan, 0.0, 0.0])})
    assert torch.equal(centre.mean, torch.zeros(4))
    state = {"m.centre.mean": torch.zeros(4), "m.fc.weight": torch.ones(2, 4),
             "m.fc.bias": torch.zeros(2)}
    with pytest.raises(NonFiniteError):
        recentred(state, torch.tensor([0.0, math.inf, 0.0, 0.0]), "fc")


def test_the_accountant_refuses_a_non_finite_event_and_caps_a_huge_one():
    """An infinite or NaN noise multiplier made opacus' accountants loop forever; a huge one
    is accounted as the cap, an upper bound on its epsilon."""
    from privacy.accounting import MAX_NOISE_MULTIPLIER, epsilon
    from privacy.ledger import Charge

    for z in (math.inf, math.nan):  # (checked first: without the defence epsilon spins)
        with pytest.raises(ValueError):
            Charge("dpsgd", z, 0.1, 10, 1.0)
        with pytest.raises(ValueError):
            epsilon([(z, 0.1, 10)], 1e-5)
    capped = epsilon([(MAX_NOISE_MULTIPLIER, 0.1, 10)], 1e-5)
    assert epsilon([(1e12, 0.1, 10)], 1e-5) == pytest.approx(capped)
