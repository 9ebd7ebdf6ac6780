"""Local training at a hospital, on real images."""

import numpy as np
import pytest
import torch

from client.training import train_local
from models.adapters import adapter_state
from models.config import TrainConfig
from models.lora import build_lora_model


@pytest.fixture(scope="module")
def few(pneumonia_small):
    train = pneumonia_small.splits["train"]
    return train.subset(np.random.default_rng(0).choice(len(train), 48, replace=False))


def _steps_taken(model, few, config) -> int:
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    train_local(model, few.images, few.labels, config, seed=0)
    handle.remove()
    return len(calls) - (1 if config.logit_adjust else 0)  # one probe pass for the class count


def test_steps_follow_epochs_or_explicit_steps(small_model_config, few):
    model = build_lora_model(small_model_config)
    assert _steps_taken(model, few, TrainConfig(batch_size=16, local_epochs=2)) == 6
    assert _steps_taken(model, few, TrainConfig(batch_size=16, local_steps=5)) == 5


def test_backbone_and_batchnorm_stay_frozen(small_model_config, few):
    torch.manual_seed(0)
    model = build_lora_model(small_model_config)
    frozen = {k: v.clone() for k, v in model.state_dict().items()
              if "lora_" not in k and "modules_to_save" not in k}
    before = adapter_state(model)
    loss = train_local(model, few.images, few.labels, TrainConfig(batch_size=16), seed=0)
    assert np.isfinite(loss)
    after = model.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen), "backbone or BN stats changed"
    assert any(not torch.equal(before[k], v) for k, v in adapter_state(model).items())
