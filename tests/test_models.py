"""Registry, LoRA wrapping and adapter tensors."""

import pytest
import torch
from peft import PeftModel
from transformers import ViTConfig, ViTForImageClassification

from models.adapters import AdapterMismatchError, adapter_state, load_adapter_state
from models.config import ModelConfig, TrainConfig, from_config_record, to_config_record
from models.lora import build_lora_model, resolve_targets
from models.registry import WeightsMismatchError, build_base_model, weights_sha256


def test_only_adapter_and_head_train(small_model_config):
    model = build_lora_model(small_model_config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    assert all("lora_" in n or "._fc." in n for n in trainable), trainable
    state = adapter_state(model)
    # ... and the head's fixed centre (models.feature_centre) travels with them, untrained.
    assert set(state) and all("lora_" in k or "_fc" in k or k.endswith(".centre.mean")
                              for k in state)
    # The frozen backbone is far bigger than what is exchanged.
    full = sum(t.numel() for t in build_base_model(small_model_config).state_dict().values())
    assert sum(t.numel() for t in state.values()) < full / 10


def test_default_targets_are_the_later_stages_pointwise_convs(small_model_config):
    model = build_lora_model(small_model_config)
    wrapped = [n.rsplit(".", 1)[0] for n, _ in model.named_modules() if n.endswith("lora_A")]
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == {"_expand_conv", "_project_conv",
                                                       "_conv_head"}
    stages = {int(n.split("_blocks.")[1].split(".")[0]) for n in wrapped if "_blocks." in n}
    assert stages == {2, 3, 4, 5, 6}


def test_unknown_target_is_an_error(small_model_config):
    base = build_base_model(small_model_config)
    with pytest.raises(ValueError, match="wrap nothing"):
        resolve_targets(base, ["no_such_layer"])


def test_adapter_round_trip_and_shape_check(small_model_config):
    torch.manual_seed(0)
    a = build_lora_model(small_model_config)
    torch.manual_seed(1)
    b = build_lora_model(small_model_config)
    state = adapter_state(a)
    load_adapter_state(b, state)
    assert all(torch.equal(state[k], v) for k, v in adapter_state(b).items())
    bad = dict(state)
    key = next(iter(bad))
    bad[key] = torch.zeros(3, 3)
    with pytest.raises(AdapterMismatchError, match=key):
        load_adapter_state(b, bad)


def test_pinned_weights_mismatch_names_both_hashes(small_model_config):
    pinned = "0" * 64
    config = ModelConfig(**{**small_model_config.__dict__, "weights_sha256": pinned})
    with pytest.raises(WeightsMismatchError) as err:
        build_lora_model(config)
    assert pinned in str(err.value)
    assert weights_sha256(config.backbone) in str(err.value)


def test_config_record_round_trip(small_model_config):
    record = to_config_record(small_model_config, TrainConfig(lr=0.01))
    assert from_config_record(ModelConfig, record) == small_model_config
    assert from_config_record(TrainConfig, record).lr == 0.01


def test_hf_backbone_from_a_local_directory(tmp_path):
    vit = ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=5,
    ))
    vit.save_pretrained(tmp_path)
    config = ModelConfig(backbone=f"hf:{tmp_path}", image_size=32, num_classes=3, lora_r=2)
    model = build_lora_model(config)
    wrapped = {n.rsplit(".", 2)[-2] for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert wrapped == {"q_proj", "v_proj"}
    assert isinstance(model, PeftModel)
    logits = model(torch.rand(2, 1, 32, 32))
    assert logits.shape == (2, 3)
    assert len(weights_sha256(config.backbone)) == 64


def test_round_learning_rate_schedule():
    from models.config import round_lr

    config = TrainConfig(lr=0.01, lr_decay=0.5)
    assert [round_lr(config, r) for r in (1, 2, 3)] == [0.01, 0.005, 0.0025]
    assert round_lr(TrainConfig(lr=0.01), 5) == 0.01
