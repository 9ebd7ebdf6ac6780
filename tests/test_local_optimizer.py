"""The local optimiser setting: AdamW by default, SGD on request, sent to hospitals with the
round's other training settings; on a single-class hospital SGD's update stays small."""

import numpy as np
import pytest
import torch

from client.training import make_local_optimizer, train_local
from core.settings import SettingsError
from models.adapters import adapter_state
from models.config import TrainConfig, from_config_record, to_config_record
from models.lora import build_lora_model
from simulations.scenarios import load_scenario


@pytest.fixture(scope="module")
def subsets(pneumonia_small):
    train = pneumonia_small.splits["train"]
    labels = train.labels.numpy()
    rng = np.random.default_rng(0)
    one = rng.choice(np.flatnonzero(labels == 1), 32, replace=False)
    zero = rng.choice(np.flatnonzero(labels == 0), 32, replace=False)
    return {"single-class": train.subset(np.sort(one)),
            "mixed": train.subset(np.sort(np.concatenate([one[:16], zero[:16]])))}


def _update_norm(model_config, data, config: TrainConfig) -> float:
    """L2 norm of the adapter update one call of local training makes from a fixed start."""
    torch.manual_seed(0)
    model = build_lora_model(model_config)
    before = {k: v.clone() for k, v in adapter_state(model).items()}
    train_local(model, data.images, data.labels, config, seed=0)
    return float(torch.sqrt(sum(((v - before[k]) ** 2).sum()
                                for k, v in adapter_state(model).items())))


def test_default_is_adamw_and_sgd_is_built_on_request():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(make_local_optimizer(params, TrainConfig()), torch.optim.AdamW)
    sgd = make_local_optimizer(params, TrainConfig(optimizer="sgd", momentum=0.5, lr=0.1),
                               lr=0.05)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.5 and sgd.param_groups[0]["lr"] == 0.05


def test_optimizer_travels_in_the_round_config():
    sent = TrainConfig(optimizer="sgd", momentum=0.8, lr=0.03)
    received = from_config_record(TrainConfig, to_config_record(sent))
    assert received.optimizer == "sgd" and received.momentum == pytest.approx(0.8)


def test_unknown_optimizer_is_refused_when_settings_are_read():
    with pytest.raises(SettingsError, match="optimizer"):
        load_scenario("ct-foundation", {"train": {"optimizer": "adam"}})


def test_sgd_moves_a_single_class_hospital_little_where_adamw_moves_it_fully(
        small_model_config, subsets):
    """Logit adjustment makes a single-class hospital's gradients tiny: AdamW still takes
    full-size steps (it normalises them), SGD's steps shrink with the gradient."""
    ratios = {}
    for optimizer, lr in (("adamw", 1e-3), ("sgd", 0.05)):
        config = TrainConfig(optimizer=optimizer, lr=lr, batch_size=16, local_steps=4)
        norms = {name: _update_norm(small_model_config, data, config)
                 for name, data in subsets.items()}
        assert norms["mixed"] > 0
        ratios[optimizer] = norms["single-class"] / norms["mixed"]
    assert ratios["adamw"] > 0.5, ratios
    assert ratios["sgd"] < 0.5 * ratios["adamw"], ratios


def test_foundation_bench_settings_reach_the_scenario(tmp_path):
    """The bench's optimiser and intensity options become the study's settings; by default
    it keeps the scenario's (SGD on the masks read as tissue)."""
    from simulations.bench.foundation import _overrides, build_parser, scenario_intensity

    default = build_parser().parse_args([])
    assert default.intensity is None  # main() fills it in from the scenario's dataset
    default.intensity = scenario_intensity()
    config = load_scenario("ct-foundation", _overrides(default, tmp_path))
    assert config.train.optimizer == "sgd" and config.data.dataset == "adrenalmnist3d-tissue"
    assert config.train.local_steps == 0
    args = build_parser().parse_args(["--optimizer", "adamw", "--lr", "0.001", "--local-steps",
                                      "4", "--intensity", "binary"])
    config = load_scenario("ct-foundation", _overrides(args, tmp_path))
    assert (config.train.optimizer, config.train.lr, config.train.local_steps) == (
        "adamw", 0.001, 4)
    assert config.data.dataset == "adrenalmnist3d"


def test_foundation_bench_trains_its_2d_comparison_with_the_2d_defaults(tmp_path):
    """The 2D backbone runs at its own default training settings, not the CT scenario's."""
    from simulations.bench.foundation import FLAT_DEFAULT, build_parser, variant_overrides

    args = build_parser().parse_args(["--intensity", "tissue"])
    config = load_scenario("ct-foundation", variant_overrides(args, tmp_path, FLAT_DEFAULT))
    default = TrainConfig()
    assert config.model.backbone == "efficientnet-lite0-imagenet"
    assert (config.train.optimizer, config.train.lr, config.train.batch_size) == (
        default.optimizer, default.lr, default.batch_size)
    assert load_scenario("ct-foundation").train.optimizer != default.optimizer
