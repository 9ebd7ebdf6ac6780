"""The fixed feature centre on the default 2D classifier (EfficientNet-Lite0 + LoRA).

``models.feature_centre`` centres the head's input on public data's mean pooled feature, the
recipe that lets DP-SGD train the head (docs/results/2026-12-07-dp-2d-centred-head.md).
Real PneumoniaMNIST images at the default 48 px; the public ones are from ``val``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from client.app import build_client_app
from client.site import SiteData
from models.adapters import adapter_state, load_adapter_state
from models.config import ModelConfig, TrainConfig, to_config_record
from models.data import ImageSet
from models.feature_centre import centre_on
from models.lora import build_lora_model
from models.registry import backbone_spec
from privacy.config import DPConfig
from simulations.inprocess import coordinator_message
from simulations.sites import cached_dataset

MODEL = ModelConfig()
CENTRE = "base_model.model.centre.mean"
HEAD = ".net._fc."
LR, CLIP, AMPLIFY = 0.1, 1.0, 1e3


def _images(split: str, count: int) -> ImageSet:
    """The first ``count // 2`` images of each class of a PneumoniaMNIST split at 48 px."""
    data = cached_dataset("pneumoniamnist", MODEL.image_size).splits[split]
    labels = data.labels.numpy()
    pick = np.sort(np.r_[np.flatnonzero(labels == 0)[: count // 2],
                         np.flatnonzero(labels == 1)[: count - count // 2]])
    return data.subset(pick)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_lora_model(MODEL)


def test_centring_on_public_images_keeps_the_logits_and_shrinks_the_head_input(model):
    """``centre_on`` sets the centre to the public images' mean pooled feature and folds the
    shift into the bias: the same logits, and a head input with much less shared component."""
    public = _images("val", 24).images
    before = adapter_state(model)
    assert CENTRE in before and not before[CENTRE].any()  # travels with the adapter, zero
    base = model.get_base_model()
    model.eval()
    try:
        with torch.no_grad():
            logits, pooled = model(public), base.pooled(public)
        centre_on(model, public, backbone_spec(MODEL.backbone).head)
        after = adapter_state(model)
        torch.testing.assert_close(after[CENTRE], pooled.mean(0), atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(model(public), logits, atol=1e-4, rtol=1e-4)
        assert (pooled - after[CENTRE]).pow(2).sum() < 0.5 * pooled.pow(2).sum()
    finally:
        load_adapter_state(model, before)


def _reply(model, site: SiteData, dpsgd: bool) -> ArrayRecord:
    """The real ClientApp's reply to one full-batch head-only SGD step on ``site``."""
    app = build_client_app(lambda context, image_size: site)
    context = Context(run_id=5, node_id=3, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    train = TrainConfig(local_steps=1, batch_size=len(site.train), lr=LR, optimizer="sgd",
                        momentum=0.0, trainable="head")
    configs = [MODEL, train]
    if dpsgd:  # noise near zero isolates the clipping
        configs.append(DPConfig(dpsgd=True, dp_noise_multiplier=1e-6, dp_max_grad_norm=CLIP,
                                dp_optimizer="sgd", dp_momentum=0.0, dp_run_rounds=1))
    config = to_config_record(*configs)
    config["server-round"] = 1
    reply = app(coordinator_message("train", ArrayRecord(adapter_state(model)), config), context)
    assert not reply.has_error(), reply.error
    return reply.content["arrays"]


@pytest.fixture(scope="module")
def hostile(model):
    """A hospital's site (the target is its first image) and the coordinator's hostile
    adapter: the centre at ``-AMPLIFY`` times the target's pooled feature."""
    train = _images("train", 8)
    site = SiteData(train=train, val=train.subset(np.arange(4)))
    model.eval()
    with torch.no_grad():
        target = model.get_base_model().pooled(train.images[:1])[0]
    state = adapter_state(model)
    state[CENTRE] = -AMPLIFY * target
    return site, state


def _head_move(sent: dict[str, torch.Tensor], reply: ArrayRecord) -> float:
    return float(np.sqrt(sum(((reply[k].numpy().astype(np.float64) - sent[k].numpy()) ** 2).sum()
                             for k in sent if HEAD in k)))


@pytest.mark.parametrize("dpsgd", [False, True])
def test_hostile_centre_is_bounded_by_dpsgd_and_the_centre_never_trains(model, hostile, dpsgd):
    """Without DP the target dominates the head update; under DP-SGD the head moves by at
    most ``lr * C``. Either way the centre and the LoRA factors come back exactly as sent."""
    site, state = hostile
    before = adapter_state(model)
    try:
        load_adapter_state(model, state)
        reply = _reply(model, site, dpsgd)
    finally:
        load_adapter_state(model, before)
    move = _head_move(state, reply)
    assert move <= LR * CLIP * (1 + 1e-4) if dpsgd else move > 100 * LR * CLIP
    for key in state:
        if HEAD not in key:
            assert np.array_equal(reply[key].numpy(), state[key].numpy()), key
