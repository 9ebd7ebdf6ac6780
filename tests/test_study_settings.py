"""The study file and every settings file read by one typed reader; the published round; the
classes a hospital maps; the generated reference. Fast: no training."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord

from client.classes import ClassMismatch, for_study
from client.site import SiteData
from client.site_folder import (
    CONFIG_FILE,
    SiteFolderError,
    init_site_folder,
    load_hospital_config,
    node_config,
)
from core.settings import SettingsError
from models.config import to_config_record
from models.data import ImageSet
from server.evaluation import AdapterSelection, combine_validation, with_prior
from server.study import load_study, study_reference
from simulations.config import ConfigError, load_config, with_overrides

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text, key, value, allowed", [
    ('[data]\npartition = "dirchlet"\n', "data.partition", "'dirchlet'",
     "one of 'iid', 'dirichlet', 'quantity' (did you mean 'dirichlet'?)"),
    ('baselines = ["poold"]\n', "baselines item", "'poold'", "one of 'pooled', 'local'"),
    ("[model]\nlora_r = 0\n", "model.lora_r", "0", ">= 1"),
    ("[train]\nbatch_size = 0\n", "train.batch_size", "0", ">= 1"),
    ('[federation]\nrounds = "three"\n', "federation.rounds", "'three'", "whole number"),
    ('[evaluation]\nselect_by = "AUC"\n', "evaluation.select_by", "'AUC'", "one of 'auc'"),
])
def test_a_bad_value_is_refused_when_read_naming_key_value_and_allowed(tmp_path, text, key,
                                                                        value, allowed):
    path = tmp_path / "sim.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    message = str(refused.value)
    assert str(path) in message and key in message and value in message, message
    assert allowed in message, message


@pytest.mark.parametrize("text, key, value, allowed", [
    ("[privacy]\ndp_delta = 2.0\n", "privacy.dp_delta", "2.0", "must be > 0, < 1"),
    ('[privacy]\ndp_accountant = "moments"\n', "privacy.dp_accountant", "'moments'",
     "must be one of 'rdp', 'prv'"),
    ('[privacy]\ndp_noise_multiplier = "1"\n', "privacy.dp_noise_multiplier", "'1'",
     "expected a number"),
    ("[privacy]\ndp_max_grad_norm = 0\n", "privacy.dp_max_grad_norm", "0", "must be > 0"),
    ("[privacy]\nupdate_hospitals = -1\n", "privacy.update_hospitals", "-1", "must be >= 0"),
    ("[privacy]\ndp_momentum = 1\n", "privacy.dp_momentum", "1", "must be >= 0, < 1"),
    ("[privacy]\ndpsgd = true\n", "[privacy] dpsgd", "true",
     "needs dp_noise_multiplier > 0 or dp_target_epsilon > 0"),
    ("[privacy]\nupdate_clip_norm = 1.0\n", "[privacy] update_clip_norm", "1",
     "needs update_noise_multiplier > 0"),
    ("[privacy]\ndp_sigma = 1.0\n", "privacy.dp_sigma", "unknown setting", "known: ["),
    ("[federation.secure_aggregation]\nquantization_bits = 40\n",
     "federation.secure_aggregation.quantization_bits", "40", "must be >= 2, <= 31"),
    ("[federation.secure_aggregation]\ngroup_size = 2\n", "group_size", "2",
     "a count of hospitals >= 3, or 0"),
    ("[federation.secure_aggregation]\ngroup_size = 4.0\n",
     "federation.secure_aggregation.group_size", "4.0", "expected a whole number"),
    ("[federation.secure_aggregation]\nthreshold = 2.5\n", "threshold", "2.5",
     "a whole number > 1) or a fraction in (0, 1]"),
    ("[federation.secure_aggregation]\nthreshold = 0\n",
     "federation.secure_aggregation.threshold", "0", "must be > 0"),
    ("[federation.secure_aggregation]\nstage_timeout_s = 0\n",
     "federation.secure_aggregation.stage_timeout_s", "0", "must be > 0"),
    ("[federation.secure_aggregation]\nenabld = true\n", "federation.secure_aggregation.enabld",
     "unknown setting", "did you mean 'enabled'?"),
])
def test_privacy_and_secure_aggregation_settings_are_refused_when_read(tmp_path, text, key,
                                                                        value, allowed):
    """``[privacy]`` (DPConfig) and ``[federation.secure_aggregation]`` (SecAggConfig) go
    through the one reader's limits: the refusal names the file, the key, the value and what
    is allowed."""
    path = tmp_path / "study.toml"
    path.write_text(text)
    with pytest.raises(SettingsError) as refused:
        load_study(path)
    message = str(refused.value)
    assert str(path) in message and key in message and value in message, message
    assert allowed in message, message


def test_privacy_limits_hold_for_values_built_in_code_and_on_the_wire():
    """A hospital builds DPConfig from the coordinator's round config: the same limits."""
    from privacy.config import DPConfig, dp_config_from_record

    with pytest.raises(ValueError, match=r"privacy.dp_delta = 1.5: must be > 0, < 1"):
        DPConfig(dp_delta=1.5)
    record = to_config_record(DPConfig())
    record["dp-grad-sample-mode"] = "hooks-v2"
    with pytest.raises(ValueError, match="dp_grad_sample_mode = 'hooks-v2': must be one of"):
        dp_config_from_record(record)


def test_unknown_keys_are_refused_with_the_closest_name(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text("[train]\nbatch_sise = 8\n")
    with pytest.raises(SettingsError, match=r"train.batch_sise: unknown setting \(did you mean "
                                            r"'batch_size'\?\)"):
        load_study(path)


def test_a_study_names_its_classes_and_holds_no_simulation_settings(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text('classes = ["normal", "pneumonia", "covid"]\n[federation]\nrounds = 2\n')
    study = load_study(path)
    assert study.model.num_classes == 3 and study.federation.rounds == 2
    path.write_text('classes = ["a", "b"]\n[data]\ndataset = "pneumoniamnist"\n')
    with pytest.raises(SettingsError, match=r"\['data'\] are simulation settings"):
        load_study(path)
    path.write_text('classes = ["a", "b"]\n[model]\nnum_classes = 3\n')
    with pytest.raises(SettingsError, match="num_classes = 3 but classes names 2"):
        load_study(path)
    path.write_text('classes = ["a", "A"]\n')
    with pytest.raises(SettingsError, match="repeats"):
        load_study(path)
    path.write_text('classes = ["a", "b"]\n[evaluation]\nprior = [0.5, 0.6]\n')
    with pytest.raises(SettingsError, match="sum to 1"):
        load_study(path)


def test_a_simulation_is_a_study_plus_its_data(tmp_path):
    path = tmp_path / "sim.toml"
    path.write_text('classes = ["normal", "pneumonia"]\n[data]\nnum_hospitals = 3\n'
                    '[federation]\nrounds = 2\n')
    config = load_config(path)
    study = config.study()
    assert type(study).__name__ == "Study" and not hasattr(study, "data")
    assert study.classes == ["normal", "pneumonia"] and study.federation.rounds == 2


def test_a_simulation_refuses_a_coordinator_test_manifest_it_would_not_use(tmp_path):
    path = tmp_path / "sim.toml"
    path.write_text('[evaluation]\ntest_manifest = "test/manifest.csv"\n')
    with pytest.raises(ConfigError, match="evaluation.test_manifest .* deployed coordinator"):
        load_config(path)
    with pytest.raises(ConfigError, match="sim-override.*test_manifest"):
        with_overrides(load_config(), {"evaluation": {"test_manifest": "t.csv"}}, "sim-override")


def test_hospital_toml_declares_classes_and_site_settings(tmp_path):
    init_site_folder(tmp_path, "h1")
    text = (tmp_path / CONFIG_FILE).read_text()
    text = text.replace('manifest = ""', 'manifest = "m.csv"').replace(
        "classes = []", 'classes = ["normal", "pneumonia"]')
    (tmp_path / CONFIG_FILE).write_text(text + '\n[site_data]\nframes = "all"\n')
    config = load_hospital_config(tmp_path)
    assert config.classes == ["normal", "pneumonia"]
    values = node_config(tmp_path, config)
    # What the daemon writes to node-config.toml at every start keeps them.
    assert values["classes"] == "normal,pneumonia"
    assert values["site-config"] == str((tmp_path / CONFIG_FILE).resolve())
    from client.data.config import from_node_config

    site = from_node_config(values)
    assert site.classes == ("normal", "pneumonia") and site.frames == "all"
    (tmp_path / CONFIG_FILE).write_text(text.replace("cpu_threads = 0", 'cpu_threads = "two"'))
    with pytest.raises(SiteFolderError, match="cpu_threads = 'two': expected a whole number"):
        load_hospital_config(tmp_path)


def _site(labels: list[int], classes: tuple[str, ...]) -> SiteData:
    images = ImageSet(torch.zeros(len(labels), 1, 4, 4), torch.tensor(labels))
    return SiteData(train=images, val=images, classes=classes)


def test_a_hospital_maps_its_labels_to_the_study_classes_by_name():
    site = for_study(_site([0, 0, 1], ("Pneumonia", "normal")), ["normal", "pneumonia"], 2)
    assert site.train.labels.tolist() == [1, 1, 0] and site.val.labels.tolist() == [1, 1, 0]
    with pytest.raises(ClassMismatch, match=r"classes \['covid'\] are not among the study's"):
        for_study(_site([0, 1], ("normal", "covid")), ["normal", "pneumonia"], 2)
    # No names: indices are the study's; one beyond its classes is refused.
    assert for_study(_site([0, 1], ()), ["a", "b"], 2).train.labels.tolist() == [0, 1]
    with pytest.raises(ClassMismatch, match="label 2 but the study has 2 classes"):
        for_study(_site([0, 2], ()), ["a", "b"], 2)


def test_validation_is_combined_by_examples_and_a_tie_goes_to_the_later_round():
    rows = [{"val_examples": 30, "val_auc": 0.9, "val_accuracy": 0.8},
            {"val_examples": 10, "val_auc": math.nan, "val_accuracy": 0.4},
            {"val_examples": 5, "val_auc": 0.1, "error": "evaluate: refused"}]
    combined = combine_validation(rows)
    assert combined["val_examples"] == 40
    assert combined["val_accuracy"] == pytest.approx((30 * 0.8 + 10 * 0.4) / 40)
    assert combined["val_auc"] == pytest.approx(0.9)  # the NaN is left out with its weight
    selection = AdapterSelection("auc")
    assert selection.consider(1, {"val_auc": 0.8})
    assert not selection.consider(2, {"val_auc": 0.7})
    assert selection.consider(3, {"val_auc": 0.8}) and selection.best_round == 3
    assert not selection.consider(4, {})


def test_the_prior_goes_back_into_the_head_bias():
    state = {"net.fc.weight": torch.zeros(2, 3), "net.fc.bias": torch.tensor([0.5, -0.5]),
             "net.lora_A.weight": torch.zeros(2, 2)}
    shifted = with_prior(ArrayRecord(state), [0.25, 0.75], 2).to_torch_state_dict()
    expected = torch.tensor([0.5, -0.5]) + torch.log(torch.tensor([0.25, 0.75]))
    assert torch.allclose(shifted["net.fc.bias"], expected)
    assert torch.equal(shifted["net.fc.weight"], state["net.fc.weight"])


def test_the_committed_study_reference_is_the_generated_one():
    committed = (ROOT / "docs" / "study-reference.md").read_text()
    assert committed == study_reference(), "run: python -m server.study > docs/study-reference.md"
    assert "| `lora_r` | int | `8` | >= 1 | LoRA rank. |" in committed


def test_the_layers_hold():
    """server and client import neither simulations nor each other (.importlinter)."""
    exe = Path(sys.executable).parent / "lint-imports"  # a dev dependency
    done = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]


def test_hospitals_evaluate_the_adapter_with_the_prior_put_back():
    from server.rounds import _evaluate_as_published

    class Recorder:
        def configure_evaluate(self, server_round, arrays, config, grid):
            self.seen = arrays.to_torch_state_dict()
            return []

    strategy = Recorder()
    _evaluate_as_published(strategy, [0.2, 0.8], 2)
    bias = torch.tensor([0.0, 0.0])
    strategy.configure_evaluate(1, ArrayRecord({"head.bias": bias}), None, None)
    assert torch.allclose(strategy.seen["head.bias"], torch.log(torch.tensor([0.2, 0.8])))


def test_medfed_study_check_reads_a_study_as_the_coordinator_does(tmp_path, capsys):
    from medfed_cli.main import main as medfed

    good = tmp_path / "study.toml"
    good.write_text('classes = ["normal", "pneumonia"]\n[federation]\ntask = "cxr"\n')
    assert medfed(["study", "check", str(good)]) == 0
    assert "classes: normal, pneumonia" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text('classes = ["normal", "pneumonia"]\n[model]\nlora_r = 0\n')
    assert medfed(["study", "check", str(bad)]) == 1
    assert "model.lora_r = 0: must be >= 1" in capsys.readouterr().out


def test_medfed_hospital_check_reads_the_site_folder(tmp_path, capsys):
    """``--dir`` checks what hospital.toml names: its manifest, class names and [site_data]."""
    from medfed_cli.main import main as medfed
    from simulations.dicom_export import export_site

    images = ImageSet(torch.rand(6, 1, 16, 16), torch.tensor([0, 1, 0, 1, 1, 0]))
    export_site(SiteData(train=images, val=images), tmp_path / "data", 0, ["normal", "pneumonia"])
    init_site_folder(tmp_path / "site", "h1")
    path = tmp_path / "site" / CONFIG_FILE
    text = path.read_text().replace('manifest = ""', 'manifest = "../data/manifest.csv"')
    path.write_text(text.replace("classes = []", 'classes = ["pneumonia", "normal"]')
                    + f'\n[site_data]\ncache_dir = "{tmp_path / "cache"}"\n')
    assert medfed(["hospital", "check", "--dir", str(tmp_path / "site"), "--image-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "ready: all 12 rows usable" in out and "pneumonia" in out
    path.write_text(text + '\n[site_data]\nframes = "some"\n')
    assert medfed(["hospital", "check", "--dir", str(tmp_path / "site")]) == 2
    assert "frames" in capsys.readouterr().out


def test_a_help_line_that_wraps_after_a_colon_stays_one_entry():
    """A continuation line holding ``word:`` (``(pure\n cryptography: ...``) is not a new
    entry: the reference shows the whole help text."""
    from core.settings import field_help
    from privacy.secagg import SecAggConfig

    text = field_help(SecAggConfig)["stage_timeout_s"]
    assert "pure cryptography: a hospital silent" in text
    assert text.endswith("wait for the round timeout.")
    assert "cryptography" not in field_help(SecAggConfig)


def test_the_reference_takes_a_settings_help_from_the_base_class_that_documents_it():
    from dataclasses import fields

    from client.data.config import SiteDataConfig
    from core.settings import field_help
    from imaging.settings import ReadSettings
    from server.study import settings_help, settings_reference

    help_of, base = settings_help(SiteDataConfig), field_help(ReadSettings)
    assert set(help_of) == {f.name for f in fields(SiteDataConfig)}  # every setting has help
    assert help_of["max_frame_bytes"] == base["max_frame_bytes"]  # written once, on the base
    assert "per patient" in help_of["split_column"] != base["split_column"]  # its own wins
    reference = settings_reference(SiteDataConfig, "Site data", "")
    assert " ".join(base["manifest_encoding"].split()) in reference
