"""Settings with complete limits (issue #37, item 2): the strategies' options are checked when
the study is read (a trim fraction of one half or more, a HetLoRA rank above the LoRA rank),
the enrolment list goes through the typed reader, and a round's model and training settings
are held on the wire to the limits of the file they came from."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord

from core.settings import SettingsError
from models.config import ModelConfig, TrainConfig, from_config_record, to_config_record
from server.study import load_study, study_from_values
from simulations.config import load_config


@pytest.mark.parametrize(("options", "refusal"), [
    ({"trim_fraction": 0.6}, "federation.options.trim_fraction = 0.6: must be >= 0, < 0.5"),
    ({"trim_fraction": 0.5}, "federation.options.trim_fraction = 0.5: must be >= 0, < 0.5"),
    ({"server_lr": 0.0}, "federation.options.server_lr = 0.0: must be > 0"),
    ({"beta_2": 1.0}, "federation.options.beta_2 = 1.0: must be >= 0, < 1"),
    ({"max_update_norm": -1.0}, "federation.options.max_update_norm = -1.0: must be >= 0"),
    ({"hetlora_ranks": [4, 0]}, "federation.options.hetlora_ranks = [4, 0]: must be each >= 1"),
])
def test_strategy_options_out_of_range_are_refused_when_the_study_is_read(options, refusal):
    with pytest.raises(SettingsError) as caught:
        study_from_values({"federation": {"options": options}}, "study s.toml")
    assert str(caught.value) == f"study s.toml: {refusal}"


def test_options_inside_their_limits_are_read():
    study = study_from_values({"federation": {"options": {"trim_fraction": 0.0,
                                                          "hetlora_ranks": [2, 8]}}}, "s")
    assert study.federation.options.trim_fraction == 0.0
    assert study.federation.options.hetlora_ranks == [2, 8]


def test_hetlora_ranks_above_the_lora_rank_are_refused_naming_both_keys(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text('classes = ["a", "b"]\n[model]\nlora_r = 4\n'
                    '[federation]\nstrategy = "hetlora"\n[federation.options]\n'
                    'hetlora_ranks = [2, 4, 8]\n')
    with pytest.raises(SettingsError, match=r"federation.options.hetlora_ranks = \[2, 4, 8\]: "
                                            r"\[8\] above model.lora_r = 4") as caught:
        load_study(path)
    assert str(caught.value).startswith(f"study {path}: ")
    path.write_text(path.read_text().replace("lora_r = 4", "lora_r = 8"))
    assert load_study(path).federation.options.hetlora_ranks == [2, 4, 8]


def test_a_simulation_refuses_the_same_ranks_and_its_flags_too(tmp_path):
    path = tmp_path / "sim.toml"
    path.write_text("[federation.options]\nhetlora_ranks = [16]\n")
    with pytest.raises(SettingsError, match="above model.lora_r = 8"):
        load_config(path)
    with pytest.raises(SettingsError, match="above model.lora_r = 2"):
        load_config(None, {"model": {"lora_r": 2}, "federation": {"options": {
            "hetlora_ranks": [4]}}})


# ------------------------------------------------------------------------ the enrolment list


@pytest.fixture
def consortium(tmp_path) -> Path:
    from server.consortium import init_consortium

    folder = tmp_path / "consortium"
    init_consortium(folder, "test-consortium")
    return folder


ENTRY = ('[[hospital]]\nname = "h1"\npublic_key = "ecdsa-sha2-nistp384 AAAA h1"\n'
         'fingerprint = "SHA256:00"\nenrolled_at = "2026-12-01T00:00:00Z"\n')


@pytest.mark.parametrize(("text", "refusal"), [
    (ENTRY + 'nodeid = "7"\n', r"\[\[hospital\]\] 1: nodeid: unknown setting "
                              r"\(did you mean 'node_id'\?\)"),
    (ENTRY + "revoked_at = 3\n", r"\[\[hospital\]\] 1: revoked_at = 3: expected a string"),
    (ENTRY.replace('fingerprint = "SHA256:00"\n', ""), r"\[\[hospital\]\] 1: missing "
                                                       r"\['fingerprint'\]"),
    ('[[hospital]]\nname = "h1"\n[extra]\n', r"holds only \[\[hospital\]\] entries"),
    ("hospital = 3\n", r"holds only \[\[hospital\]\] entries"),
    ("[[hospital", "not valid TOML"),
])
def test_a_damaged_enrolment_list_is_refused_naming_the_entry(consortium, text, refusal):
    from server.consortium import ConsortiumError, load_coordinator_config, load_enrolments

    path = consortium / load_coordinator_config(consortium).enrolment
    path.write_text(text)
    with pytest.raises(ConsortiumError, match=refusal) as caught:
        load_enrolments(consortium)
    assert str(caught.value).startswith(f"enrolment list {path}")


def test_a_whole_enrolment_list_is_read(consortium):
    from server.consortium import load_coordinator_config, load_enrolments

    path = consortium / load_coordinator_config(consortium).enrolment
    path.write_text(ENTRY + 'node_id = "7"\n')
    (entry,) = load_enrolments(consortium)
    assert (entry.name, entry.node_id, entry.active) == ("h1", "7", True)


# ------------------------------------------------------------------------------ the wire


@pytest.mark.parametrize(("cls", "key", "value", "refusal"), [
    (ModelConfig, "lora-r", 0, "lora-r = 0: must be >= 1"),
    (ModelConfig, "image-size", "48", "image-size = '48': expected a whole number"),
    (TrainConfig, "lr", -0.1, "lr = -0.1: must be > 0"),
    (TrainConfig, "optimizer", "adam", "optimizer = 'adam': must be one of 'adamw', 'sgd'"),
])
def test_a_round_config_out_of_its_limits_is_refused_naming_the_wire_key(cls, key, value,
                                                                         refusal):
    record = to_config_record(ModelConfig(), TrainConfig())
    record[key] = value
    with pytest.raises(SettingsError) as caught:
        from_config_record(cls, record)
    assert str(caught.value).startswith(f"the coordinator's message: {refusal}")


def test_a_round_config_within_its_limits_reads_back_equal():
    sent = (ModelConfig(lora_r=4, lora_targets=["conv"]), TrainConfig(lr=0.5, optimizer="sgd"))
    record = to_config_record(*sent)
    assert (from_config_record(ModelConfig, record), from_config_record(TrainConfig, record)) \
        == sent
    with pytest.raises(KeyError, match="no 'image-size'"):
        from_config_record(ModelConfig, ConfigRecord({"backbone": "x"}))


@pytest.mark.parametrize(("line", "refusal"), [
    ("port = 70000", "port = 70000: must be >= 1, <= 65535"),
    ("admin_port = -1", "admin_port = -1: must be >= 0, <= 65535"),
    ("wait_for_hospitals_s = -5", "wait_for_hospitals_s = -5.0: must be >= 0"),
    ("roster_valid_days = 0", "roster_valid_days = 0.0: must be > 0"),
])
def test_a_coordinator_setting_out_of_range_is_refused_naming_it(consortium, line, refusal):
    from server.consortium import ConsortiumError, load_coordinator_config

    path = consortium / "coordinator.toml"
    key = line.split(" = ")[0]
    text = "\n".join(other for other in path.read_text().splitlines()
                     if not other.startswith(f"{key} ="))
    path.write_text(text.replace("[coordinator]", f"[coordinator]\n{line}"))
    with pytest.raises(ConsortiumError) as caught:
        load_coordinator_config(consortium)
    assert str(caught.value) == f"{path} [coordinator]: {refusal}"
