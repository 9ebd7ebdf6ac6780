"""Before round 1 every hospital dry-runs the study against its own policies and data (issue
#34, item 3): the real ClientApp answers a ``query`` item by item (pass, or fail naming the
setting), its audit log records the answer, and the coordinator starts nothing when any hospital
would refuse the study later, naming the hospital and the setting."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from flwr.app import Context, RecordDict

from client.app import build_client_app
from client.audit import read_audit_log
from models.config import TrainConfig
from privacy.config import DPConfig
from privacy.ledger import Ledger
from server.config import FederationConfig
from server.preflight import CHECK_FILE, CHECK_RECORD, refusals
from server.records import RunRecords
from server.rounds import FederationError, run_federation, study_round_config
from server.study import Study
from simulations.inprocess import InProcessGrid, message_with_metadata

TASK = "pneumonia-cxr"
TRAIN = TrainConfig(local_epochs=1, batch_size=16, lr=1e-3)
DP = DPConfig(dpsgd=True, dp_noise_multiplier=1.0)


def _hospital(folder, *, secure: bool = False, min_val: int = 10, budget: float = 50.0,
              dataset_id: str = "cxr-2026") -> dict[str, object]:
    """A hospital's node config: its run policy, privacy policy, ledger and audit log."""
    folder.mkdir()
    (folder / "run-policy.toml").write_text(
        'allowed_backbones = ["efficientnet-lite0-imagenet"]\n'
        f'allowed_tasks = ["{TASK}"]\nmin_hospitals = 2\n'
        f"require_secure_aggregation = {'true' if secure else 'false'}\n"
        f"min_evaluation_examples = {min_val}\n")
    (folder / "privacy-policy.toml").write_text(f"max_epsilon = {budget}\ndelta = 1e-5\n")
    config = {"partition-id": 0, "run-policy": str(folder / "run-policy.toml"),
              "privacy-policy": str(folder / "privacy-policy.toml"),
              "privacy-ledger": str(folder / "ledger.sqlite"),
              "audit-log": str(folder / "audit.jsonl")}
    return config | ({"dataset-id": dataset_id} if dataset_id else {})


def _study(small_model_config) -> Study:
    federation = FederationConfig(rounds=3, min_hospitals=2, fraction_evaluate=1.0, task=TASK)
    return Study(model=small_model_config, train=TRAIN, federation=federation, privacy=DP)


def _ask(site, node_config, config):
    app = build_client_app(lambda context, image_size: site)
    context = Context(run_id=4, node_id=9, node_config=node_config, state=RecordDict(),
                      run_config={})
    reply = app(message_with_metadata("query", RecordDict({"config": config}), run_id=4),
                context)
    assert not reply.has_error(), reply.error
    return dict(reply.content.config_records[CHECK_RECORD])


def test_a_hospital_answers_the_dry_run_item_by_item(site, small_model_config, tmp_path):
    config = study_round_config(_study(small_model_config))
    good = _ask(site, _hospital(tmp_path / "good"), config)
    assert set(good) == {"run-policy", "secure-aggregation", "data", "classes", "evaluation",
                         "dataset-id", "differential-privacy", "budget"}
    assert set(good.values()) == {"pass"}, good

    strict = _hospital(tmp_path / "strict", secure=True, min_val=len(site.val) + 1,
                       dataset_id="")
    answers = _ask(site, strict, config)
    assert "'require_secure_aggregation'" in answers["secure-aggregation"]
    assert "'min_evaluation_examples'" in answers["evaluation"]
    assert "dataset_id" in answers["dataset-id"]
    assert answers["run-policy"] == "pass" and answers["classes"] == "pass"
    # Pass/fail and the setting only: no count of images leaves with the answer.
    assert str(len(site.val)) not in answers["evaluation"]
    # Its egress audit log records the answer like every other reply.
    (entry,) = read_audit_log(tmp_path / "strict" / "audit.jsonl")
    assert entry["message_type"] == "query" and entry["tensors"] == []
    assert entry["configs"][CHECK_RECORD] == answers

    poor = _ask(site, _hospital(tmp_path / "poor", budget=0.5), config)
    assert "'max_epsilon'" in poor["budget"] and "3 rounds" in poor["budget"]
    # Nothing was trained, charged or evaluated by asking.
    assert not (tmp_path / "poor" / "evaluation-count.sqlite").exists()


def test_the_coordinator_starts_nothing_a_hospital_would_refuse(site, small_model_config,
                                                                tmp_path):
    nodes = {11: _hospital(tmp_path / "h0"),
             12: _hospital(tmp_path / "h1", min_val=len(site.val) + 1) | {"partition-id": 1}}
    grid = InProcessGrid(build_client_app(lambda context, image_size: site), nodes)
    study = _study(small_model_config)
    records = RunRecords(tmp_path / "run")
    with pytest.raises(FederationError) as failed:
        run_federation(grid, study.federation, study.model, replace(TRAIN, local_steps=2),
                       None, records, dp=study.privacy, study_check=True)
    message = str(failed.value)
    assert "the study was not started" in message
    assert "hospital 1, evaluation: run policy 'min_evaluation_examples'" in message
    assert "hospital 0" not in message
    answers = json.loads((tmp_path / "run" / CHECK_FILE).read_text())
    assert set(answers["0"].values()) == {"pass"}
    assert not records.train_rows()  # no round was sent
    assert all(Ledger(tmp_path / h / "ledger.sqlite").rows() == [] for h in ("h0", "h1"))


def test_a_hospital_that_does_not_answer_is_not_a_refusal():
    answers = {"st-mary": {"answer": "no answer: Node Unavailable"},
               "north": {"budget": "pass", "evaluation": "fail: run policy 'x': y"}}
    assert refusals(answers) == ["hospital north, evaluation: run policy 'x': y"]


def test_hospital_check_study_runs_the_same_items_on_the_site_folder(site, tmp_path):
    """``medfed hospital check --dir SITE --study FILE``: the site folder's own policies and
    data (a MedMNIST-format .npz), item by item, and whether the hospital takes part."""
    import numpy as np
    import tomli_w

    from client.site_folder import CONFIG_FILE, init_site_folder, load_hospital_config
    from medfed_cli.hospital import study_check_text

    folder = tmp_path / "st-mary"
    init_site_folder(folder, "st-mary")
    pixels = {f"{split}_images": (getattr(site, split).images[:, 0].numpy() * 255).astype(
        np.uint8) for split in ("train", "val")}
    np.savez(folder / "site.npz", **pixels, train_labels=site.train.labels.numpy(),
             val_labels=site.val.labels.numpy())
    hospital = load_hospital_config(folder).__dict__ | {"data_npz": "site.npz",
                                                        "dataset_id": ""}
    (folder / CONFIG_FILE).write_text(tomli_w.dumps({"hospital": hospital}))
    (folder / "run-policy.toml").write_text(
        'allowed_backbones = ["efficientnet-lite0-imagenet"]\n'
        f'allowed_tasks = ["{TASK}"]\nmin_hospitals = 2\n')
    (folder / hospital["privacy_policy"]).write_text("max_epsilon = 8.0\ndelta = 1e-5\n")
    study = tmp_path / "lung.toml"
    study.write_text(f'[model]\nimage_size = 32\nlora_r = 4\nlora_alpha = 8\n'
                     f'[federation]\nrounds = 3\nmin_hospitals = 2\ntask = "{TASK}"\n'
                     f'[privacy]\ndpsgd = true\ndp_noise_multiplier = 1.0\n')

    text, passed = study_check_text(folder, study)
    assert not passed
    lines = {line.split()[0]: line for line in text.splitlines()[1:-1]}
    # The policy sets only allow-lists: min_evaluation_examples keeps its default, 50, above
    # the 32 validation images, and the hospital declared no dataset id.
    assert "'min_evaluation_examples'" in lines["evaluation"]
    assert "dataset_id in hospital.toml" in lines["dataset-id"]
    assert lines["run-policy"].endswith("pass") and lines["data"].endswith("pass")
    assert "would refuse the study" in text
