"""Simulation configs from TOML."""

import pytest

from simulations.config import ConfigError, load_config


def test_file_then_overrides(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text('seed = 4\n[data]\nnum_hospitals = 7\nalpha = 1\n[model]\nlora_r = 2\n')
    config = load_config(path, {"federation": {"rounds": 9}})
    assert (config.seed, config.data.num_hospitals, config.data.alpha) == (4, 7, 1.0)
    assert config.model.lora_r == 2 and config.federation.rounds == 9


def test_unknown_and_mistyped_settings_name_the_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[data]\nnum_hospitls = 3\n")
    with pytest.raises(ConfigError, match="num_hospitls"):
        load_config(path)
    with pytest.raises(ConfigError, match="rounds"):
        load_config(None, {"federation": {"rounds": "three"}})


def test_fedprox_weight_has_one_home(tmp_path):
    """FedProx's mu is set once, as a strategy option; a [train] proximal_mu is refused with a
    pointer there, in a file and in overrides alike. Its default (0, as every run's
    config.toml lists it) stays accepted, so a run's settings load again."""
    path = tmp_path / "study.toml"
    path.write_text("[train]\nproximal_mu = 0.1\n")
    with pytest.raises(ConfigError, match=r"federation\.options\] proximal_mu"):
        load_config(path)
    with pytest.raises(ConfigError, match="not a study setting"):
        load_config(None, {"train": {"proximal-mu": 0.1}})
    path.write_text("[train]\nproximal_mu = 0.0\n")
    assert load_config(path).train.proximal_mu == 0.0
    path.write_text('[federation]\nstrategy = "fedprox"\n[federation.options]\nproximal_mu = 0.1\n')
    assert load_config(path).federation.options.proximal_mu == 0.1


def test_a_runs_written_settings_load_again(tmp_path):
    """config.toml in a run directory lists every setting; reports and resumed studies read it."""
    import tomli_w

    from simulations.config import config_dict

    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(config_dict(load_config())))
    assert load_config(path) == load_config()
