"""Attack: a coordinator uses the head's centre and ``train.trainable`` to single out a patient.

The centre (``models.feature_centre``) and what trains are the coordinator's to choose. Knowing
a target volume, it sets the centre to ``-K`` times the target's pooled feature, so that the
target's head gradient ``(p - y)(x - c)`` is about ``K`` times anyone's ordinary one, trains the
head alone, and reads the head update in the hospital's reply. Without DP that update is
dominated by the target. Under DP-SGD it must not be: each example's contribution is clipped
to ``C`` whatever the model, which is what the accountant charges for, and the tensors that do
not train come back exactly as sent. Real CT encoder, real AdrenalMNIST3D volumes, the real
ClientApp.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, RecordDict

from client.app import build_client_app
from client.site import SiteData
from models.adapters import adapter_state, load_adapter_state
from models.config import ModelConfig, TrainConfig, to_config_record
from models.data import ImageSet
from models.lora import build_lora_model
from models.registry import CT_BACKBONE
from privacy.config import DPConfig
from simulations.datasets import find_medmnist
from simulations.inprocess import coordinator_message

SIZE = 16
LR, CLIP, AMPLIFY = 0.1, 1.0, 1e3
MODEL = ModelConfig(backbone=CT_BACKBONE, image_size=SIZE, lora_targets=["layer4"])
CENTRE = "base_model.model.centre.mean"


def _volumes(count: int) -> ImageSet:
    with np.load(find_medmnist("adrenalmnist3d", download=False)) as archive:
        images = torch.from_numpy(archive["train_images"][:count]).float().div(255.0)
        labels = torch.from_numpy(archive["train_labels"][:count].reshape(-1)).long()
    images = F.interpolate(images.unsqueeze(1), size=(SIZE,) * 3, mode="trilinear")
    return ImageSet(images.contiguous(), labels)


@pytest.fixture(scope="module")
def attack():
    """The hospital's site (the target is its first volume) and the coordinator's hostile
    adapter: the centre at ``-AMPLIFY`` times the target's pooled feature."""
    train = _volumes(8)
    site = SiteData(train=train, val=train.subset(np.arange(4)))
    torch.manual_seed(0)
    model = build_lora_model(MODEL)
    model.eval()
    with torch.no_grad():
        target = model.get_base_model().pooled(train.images[:1])[0]
    state = adapter_state(model)
    state[CENTRE] = -AMPLIFY * target
    load_adapter_state(model, state)
    return site, ArrayRecord(adapter_state(model))


def _reply(site: SiteData, arrays: ArrayRecord, dpsgd: bool) -> ArrayRecord:
    app = build_client_app(lambda context, image_size: site)
    context = Context(run_id=5, node_id=3, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    # One full-batch step (sampling rate 1), plain SGD: the head moves by lr times the mean
    # of the (clipped) per-example gradients. Noise near zero isolates the clipping.
    train = TrainConfig(local_steps=1, batch_size=len(site.train), lr=LR, optimizer="sgd",
                        momentum=0.0, trainable="head")
    configs = [MODEL, train]
    if dpsgd:
        configs.append(DPConfig(dpsgd=True, dp_noise_multiplier=1e-6, dp_max_grad_norm=CLIP,
                                dp_optimizer="sgd", dp_momentum=0.0, dp_run_rounds=1))
    config = to_config_record(*configs)
    config["server-round"] = 1
    reply = app(coordinator_message("train", arrays, config), context)
    assert not reply.has_error(), reply.error
    return reply.content["arrays"]


def _head_move(sent: ArrayRecord, reply: ArrayRecord) -> float:
    return float(np.sqrt(sum(
        ((reply[k].numpy().astype(np.float64) - sent[k].numpy()) ** 2).sum()
        for k in sent if ".fc." in k)))


def test_without_dp_the_hostile_centre_lets_the_target_dominate_the_update(attack):
    site, arrays = attack
    assert _head_move(arrays, _reply(site, arrays, dpsgd=False)) > 100 * LR * CLIP


def test_under_dpsgd_the_target_moves_the_head_no_more_than_the_clipping_bound(attack):
    site, arrays = attack
    reply = _reply(site, arrays, dpsgd=True)
    # Mean of clipped per-example gradients: at most C, however the centre scales one of them.
    assert _head_move(arrays, reply) <= LR * CLIP * (1 + 1e-4)
    # What does not train (LoRA factors, the centre) comes back exactly as sent.
    for key in arrays:
        if ".fc." not in key:
            assert np.array_equal(reply[key].numpy(), arrays[key].numpy()), key
