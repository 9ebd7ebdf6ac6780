"""``medfed predict``: a published adapter run on real DICOM files (real PneumoniaMNIST test
images written with pydicom), every pin checked before anything runs, and external validation
on a labelled manifest scored as sklearn scores the same predictions."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from published_run import CLASSES, PRIOR
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    roc_auc_score,
)

from inference.predict import predict_studies, reader_settings, write_reports
from inference.published import PinError, load_published
from inference.studies import folder_studies, manifest_studies
from inference.validation import expected_calibration_error
from medfed_cli.main import main
from models.adapters import ADAPTER_FILE
from models.card import CARD_FILE
from simulations.dicom_export import dicom_dataset

STUDIES = 24


@pytest.fixture(scope="module")
def images(pneumonia_small):
    """``STUDIES`` real test images as uint8 ``(N, 32, 32)`` and their labels."""
    test = pneumonia_small.splits["test"]
    pick = np.random.default_rng(0).choice(len(test), STUDIES, replace=False)
    subset = test.subset(pick)
    pixels = (subset.images.numpy()[:, 0] * 255).round().clip(0, 255).astype(np.uint8)
    return pixels, subset.labels.numpy()


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory, images):
    """The images as DICOM files under ``studies/``, with a labelled manifest beside them."""
    root = tmp_path_factory.mktemp("site")
    (root / "studies" / "ward-a").mkdir(parents=True)
    rows = []
    for k, (pixels, label) in enumerate(zip(*images, strict=True)):
        name = f"studies/ward-a/{k:03d}.dcm"
        dicom_dataset(pixels, f"PAT-{k}", full_range_window=True).save_as(
            root / name, enforce_file_format=True)
        rows.append({"path": name, "label": CLASSES[label], "patient_id": f"PAT-{k}"})
    pd.DataFrame(rows).to_csv(root / "labelled.csv", index=False)
    return root


def model_output(run_dir, pixels: np.ndarray) -> np.ndarray:
    """The adapter's own probabilities on ``(N, S, S)`` uint8 images: built with peft's own
    loader, not medfed predict's."""
    from peft import PeftModel

    from models.config import ModelConfig
    from models.registry import build_base_model

    model = PeftModel.from_pretrained(build_base_model(ModelConfig(image_size=32)),
                                      run_dir / "adapter").eval()
    with torch.no_grad():
        x = torch.from_numpy(pixels[:, None].astype(np.float32) / 255.0)
        return model(x).softmax(dim=1).numpy()


def test_predict_on_a_folder_matches_the_models_own_output(published_run, dicom_folder,
                                                           images, tmp_path):
    (dicom_folder / "studies" / "notes.txt").write_text("not an image")
    published = load_published(published_run, "cpu")
    source = folder_studies(dicom_folder / "studies")
    outcome = predict_studies(published, source, tmp_path, batch_size=5)
    summary = write_reports(published, source, outcome, tmp_path)
    table = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False)
    assert len(table) == STUDIES + 1 and summary["predicted"] == STUDIES
    refused = table[table.study == "notes.txt"].iloc[0]
    assert refused.error.startswith("not-dicom") and refused.probability_normal == ""
    table = table[table.study != "notes.txt"]
    assert list(table.study) == [f"ward-a/{k:03d}.dcm" for k in range(STUDIES)]
    probs = table[[f"probability_{c}" for c in CLASSES]].to_numpy(dtype=float)
    np.testing.assert_allclose(probs, model_output(published_run, images[0]), atol=1e-5)
    assert list(table.predicted) == [CLASSES[i] for i in probs.argmax(axis=1)]
    assert set(table.rule) == {f"argmax; prior normal={PRIOR[0]:g}, pneumonia={PRIOR[1]:g}"}
    # Nothing of the patients is written: the DICOM files' Patient ID / Name are PAT-<k>.
    assert "PAT-" not in (tmp_path / "predictions.csv").read_text()
    assert "PAT-" not in (tmp_path / "summary.json").read_text()


def test_external_validation_matches_sklearn(published_run, dicom_folder, tmp_path):
    published = load_published(published_run, "cpu")
    source = manifest_studies(dicom_folder / "labelled.csv", reader_settings(published))
    assert source.labelled
    outcome = predict_studies(published, source, tmp_path, batch_size=7)
    write_reports(published, source, outcome, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    table = pd.read_csv(tmp_path / "predictions.csv")
    labels = table.label.map(CLASSES.index).to_numpy()
    probs = table[[f"probability_{c}" for c in CLASSES]].to_numpy(dtype=float)
    predicted = probs.argmax(axis=1)
    assert metrics["studies"] == STUDIES
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, probs[:, 1]), abs=1e-6)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert metrics["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(labels, predicted))
    assert metrics["brier"] == pytest.approx(brier_score_loss(labels, probs[:, 1]), abs=1e-6)
    majority = np.bincount(labels).max() / len(labels)
    assert metrics["majority_class_rate"] == pytest.approx(majority)
    assert metrics["ece"] == pytest.approx(expected_calibration_error(labels, probs), abs=1e-6)


def test_ece_by_hand():
    labels = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
    # Top-class confidences 0.9 (right), 0.8 (right), 0.6 (wrong), 0.55 (wrong): bins
    # (0.8, 0.9] {0.9}, (0.7, 0.8] {0.8}, (0.5, 0.6] {0.6, 0.55}.
    expected = (abs(1 - 0.9) + abs(1 - 0.8) + 2 * abs(0 - 0.575)) / 4
    assert expected_calibration_error(labels, probs) == pytest.approx(expected)


def _tampered(published_run, tmp_path, edit_card=None, edit_adapter=None):
    folder = tmp_path / "adapter"
    shutil.copytree(published_run / "adapter", folder)
    if edit_card is not None:
        values = json.loads((folder / CARD_FILE).read_text())
        edit_card(values)
        (folder / CARD_FILE).write_text(json.dumps(values))
    if edit_adapter is not None:
        edit_adapter(folder / ADAPTER_FILE)
    return folder


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


TAMPERED = {
    "weights": (lambda v: v["model"].update(weights_sha256="0" * 64), None, "base weights"),
    "adapter": (None, _flip_last_byte, "adapter: "),
    "classes": (lambda v: v.update(classes=CLASSES[::-1]), None, "classes: the card says"),
    "task": (lambda v: v.update(task="segmentation"), None, "task: "),
    "preprocessing": (lambda v: v["preprocessing"].update(image_size=64), None,
                      "preprocessing.image_size: the card says 64 but the adapter file was "
                      "published with 32"),
}


@pytest.mark.parametrize("pin", sorted(TAMPERED))
def test_each_tampered_pin_is_refused_with_its_reason(published_run, tmp_path, pin):
    edit_card, edit_adapter, reason = TAMPERED[pin]
    folder = _tampered(published_run, tmp_path, edit_card, edit_adapter)
    with pytest.raises(PinError, match=reason):
        load_published(folder, "cpu")


def test_other_base_weights_on_this_machine_are_refused(published_run, monkeypatch):
    import inference.published

    monkeypatch.setattr(inference.published, "weights_sha256", lambda name: "f" * 64)
    with pytest.raises(PinError, match="this machine's 'efficientnet-lite0-imagenet' has"):
        load_published(published_run, "cpu")


def test_the_command_predicts_and_refuses(published_run, dicom_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["predict", str(published_run), "--manifest",
                 str(dicom_folder / "labelled.csv"), "--out", str(out), "--batch-size", "8",
                 "--device", "cpu", "--no-progress"])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"predictions.csv", "summary.json", "metrics.json"}
    with open(out / "predictions.csv") as handle:
        assert len(list(csv.DictReader(handle))) == STUDIES
    tampered = _tampered(published_run, tmp_path, lambda v: v.update(task="segmentation"))
    code = main(["predict", str(tampered), "--input", str(dicom_folder / "studies"),
                 "--out", str(tmp_path / "refused"), "--device", "cpu"])
    assert code == 1 and not (tmp_path / "refused").exists()


def test_studies_outside_the_folder_are_refused_and_unlabelled_manifests_read(tmp_path):
    from imaging.settings import ReadSettings

    secret = tmp_path / "secret.dcm"
    secret.write_bytes(b"DICM")
    folder = tmp_path / "export"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "one.dcm").write_bytes(b"x")
    (folder / "a" / ".hidden").write_bytes(b"x")
    (folder / "link.dcm").symlink_to(secret)
    source = folder_studies(folder)
    assert [s.identifier for s in source.studies] == ["a/one.dcm", "link.dcm"]
    assert source.studies[1].entry is None and source.studies[1].problem.startswith("outside")
    manifest = folder / "studies.csv"
    manifest.write_text("path;note\na/one.dcm;x\n../secret.dcm;y\n\n")
    listed = manifest_studies(manifest, ReadSettings(classes=tuple(CLASSES)))
    assert not listed.labelled
    assert [(s.identifier, s.entry is None) for s in listed.studies] == [
        ("a/one.dcm", False), ("../secret.dcm", True)]
