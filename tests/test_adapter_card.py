"""The adapter's card: written by a short real run where the adapter is published, read back
by the strict reader, which refuses unknown keys, missing keys and bad values."""

from __future__ import annotations

import json

import pytest
from published_run import CLASSES

from core.hashing import file_sha256
from models.adapters import ADAPTER_FILE
from models.card import CARD_FILE, CardError, embedded_pins, read_card
from models.config import ModelConfig
from models.registry import weights_sha256


@pytest.fixture(scope="module")
def run_dir(published_run):
    return published_run


def test_a_run_publishes_its_card_and_it_reads_back(run_dir):
    card = read_card(run_dir / "adapter")
    assert card.study == "pneumonia-study" and card.declared_task == "pneumonia-cxr"
    assert card.task == "classification" and card.classes == CLASSES
    assert card.model.backbone == "efficientnet-lite0-imagenet"
    assert card.model.weights_sha256 == weights_sha256("efficientnet-lite0-imagenet")
    assert card.preprocessing.image_size == 32 and card.preprocessing.channels == 3
    assert len(card.preprocessing.mean) == 3 and card.preprocessing.frames == "middle"
    assert (card.rounds, card.published_round, card.hospitals) == (1, 1, 3)
    assert card.strategy == "fedavg" and card.secure_aggregation is False
    assert 0.0 <= card.validation["auc"] <= 1.0 and card.validation["examples"] > 0
    assert card.decision.prior == [0.3, 0.7] and card.decision.select_by == "auc"
    assert card.privacy.dpsgd is False and card.privacy.epsilon_max is None
    assert card.medfed_version and card.code_commit
    # The hashes are of the files as they are on disk, the card left out.
    adapter = run_dir / "adapter"
    assert set(card.adapter_files) == {p.name for p in adapter.iterdir()} - {CARD_FILE}
    assert card.adapter_files[ADAPTER_FILE] == file_sha256(adapter / ADAPTER_FILE)
    # The prediction-relevant fields are in the adapter file too, which the hash covers.
    assert embedded_pins((adapter / ADAPTER_FILE).read_bytes(), "adapter") == card.pins()


def test_the_published_adapter_still_loads_with_peft(run_dir):
    from peft import PeftModel

    from models.registry import build_base_model

    model = PeftModel.from_pretrained(build_base_model(ModelConfig(image_size=32)),
                                      run_dir / "adapter")
    assert model is not None


def _edited(run_dir, tmp_path, edit) -> CardError:
    values = json.loads((run_dir / "adapter" / CARD_FILE).read_text())
    edit(values)
    path = tmp_path / CARD_FILE
    path.write_text(json.dumps(values))
    with pytest.raises(CardError) as refused:
        read_card(path)
    return refused.value


@pytest.mark.parametrize("edit, says", [
    (lambda v: v.update(extra=1), "unknown setting"),
    (lambda v: v["model"].update(weights="x"), "unknown setting"),
    (lambda v: v.pop("classes"), "classes"),
    (lambda v: v.update(task="regression"), "task"),
    (lambda v: v.update(classes=["a"]), "classes"),
    (lambda v: v["model"].update(weights_sha256="abc"), "weights_sha256"),
    (lambda v: v["adapter_files"].update({ADAPTER_FILE: "0" * 63}), "adapter_files"),
    (lambda v: v.update(rounds="two"), "rounds"),
    (lambda v: v["validation"].update(auc=float("nan")), "validation.auc"),
    (lambda v: v.update(format=2), "format"),
    (lambda v: v["preprocessing"].update(std=[0.0, 1.0, 1.0]), "std"),
])
def test_the_reader_refuses_a_bad_card(run_dir, tmp_path, edit, says):
    assert says in str(_edited(run_dir, tmp_path, edit))
