"""A coordinator-held test set, read from a DICOM manifest by the reader the hospitals use.

Real pydicom files written from MedMNIST's test split (``../shared/data``); no network, no
SuperLink. The coordinator's evaluator reads the manifest named by the study's
``[evaluation] test_manifest``, maps its class names to the study's, and scores an adapter; a
study without it makes the deployment coordinator read no data file at all.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import tomli_w
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from client.data import SiteDataConfig, prepare_site
from client.site import SiteData
from imaging.problems import ManifestError
from models.adapters import adapter_state
from models.config import ModelConfig, TrainConfig
from models.data import ImageSet
from models.metrics import evaluate
from server.deployment_app import RUN_DIR_KEY, STUDY_KEY, deployment_server_run
from server.evaluation import central_evaluator, coordinator_test_set
from server.study import load_study
from simulations.bench.real_study import audited
from simulations.config import DataConfig
from simulations.datasets import search_dirs
from simulations.dicom_export import export_site
from simulations.sites import held_out_test_set

CLASSES = ["normal", "pneumonia"]
SIZE = 32


def _test_manifest(folder: Path, count: int = 24) -> tuple[Path, ImageSet]:
    """MedMNIST's test images written as DICOM files with a manifest whose labels are the
    class names (``folder/manifest.csv``)."""
    test = held_out_test_set(DataConfig(max_test_examples=count), SIZE, seed=0)
    empty = ImageSet(test.images[:0], test.labels[:0])
    manifest = export_site(SiteData(train=test, val=empty), folder, 9, CLASSES)
    return manifest, test


def _study(folder: Path, **evaluation) -> Path:
    study = folder / "study.toml"
    study.write_text(tomli_w.dumps({
        "classes": CLASSES, "model": {"image_size": SIZE, "lora_r": 4},
        "federation": {"rounds": 1, "min_hospitals": 1},
        "evaluation": {"select_by": "auc", **evaluation}}))
    return study


def test_the_coordinator_reads_its_test_manifest_like_a_hospital_and_scores_the_adapter(
        tmp_path):
    manifest, test = _test_manifest(tmp_path / "coordinator" / "test-set")
    # Relative to the study file's folder.
    study = load_study(_study(tmp_path / "coordinator", test_manifest="test-set/manifest.csv"))
    assert study.evaluation.test_manifest == str(manifest.resolve())

    images, report = coordinator_test_set(study)
    assert report.rows == report.usable_rows == len(test) and not report.problems
    assert report.images == {name: int((test.labels == k).sum())
                             for k, name in enumerate(CLASSES)}
    assert report.fingerprint.startswith("sha256:")
    # The images are MedMNIST's test images again (8 bits each way), labelled by class name.
    assert images.images.shape == (len(test), 1, SIZE, SIZE)
    assert torch.equal(images.labels, test.labels)
    assert torch.allclose(images.images, test.images, atol=1 / 255)
    # ... and exactly what a hospital's reader makes of the same manifest.
    hospital, _ = prepare_site(manifest, SiteDataConfig(classes=tuple(CLASSES),
                                                        use_cache=False), SIZE)
    assert torch.equal(hospital["train"].images, images.images)

    # The coordinator's evaluator scores the adapter it is given, on these images.
    from server.rounds import initial_model

    model = initial_model(ModelConfig(image_size=SIZE, lora_r=4, num_classes=2),
                          TrainConfig().seed)
    evaluator = central_evaluator(model, images)
    start = dict(evaluator(0, ArrayRecord(adapter_state(model))))
    assert set(start) >= {"test-auc", "test-accuracy", "test-balanced-accuracy", "test-loss"}
    assert start["test-auc"] == pytest.approx(evaluate(model, images.images,
                                                       images.labels)["auc"])
    # Another adapter, another score: the head's bias pushed towards "pneumonia".
    state = adapter_state(model)
    bias = next(k for k, t in state.items() if k.endswith("bias") and "lora_" not in k
                and tuple(t.shape) == (2,))
    state[bias] = state[bias] + torch.tensor([-20.0, 20.0])
    pushed = dict(evaluator(1, ArrayRecord(state)))
    assert pushed["test-accuracy"] == pytest.approx(float((test.labels == 1).float().mean()))
    assert pushed["test-loss"] != pytest.approx(start["test-loss"])


def test_a_test_manifest_with_class_names_the_study_lacks_is_refused(tmp_path):
    manifest, _ = _test_manifest(tmp_path / "set", count=6)
    rows = list(csv.DictReader(manifest.open()))
    for row in rows:
        row["label"] = "covid"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    study = load_study(_study(tmp_path, test_manifest=str(manifest)))
    with pytest.raises(ManifestError, match="none of its 6 rows gives an image.*'covid' is "
                                            "not in the class list"):
        coordinator_test_set(study)


def _context(study: Path, run_dir: Path) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                   run_config={STUDY_KEY: str(study), RUN_DIR_KEY: str(run_dir)})


def test_a_deployment_coordinator_without_a_test_manifest_reads_no_data_file(tmp_path,
                                                                             monkeypatch):
    data_dir = tmp_path / "coordinator-data"
    data_dir.mkdir()
    monkeypatch.setenv("MEDFED_DATA_DIR", str(data_dir))
    _test_manifest(tmp_path / "unused-set", count=4)  # data within reach, not named
    study = _study(tmp_path)
    watched = [tmp_path, *[d for d in search_dirs() if d.is_dir()]]
    with audited(watched) as audit:
        run = deployment_server_run(_context(study, tmp_path / "run"))
    assert run.test_set is None and run.records.test_set is None
    # The study file and the run directory's config: nothing else under the watched folders.
    assert sorted(Path(p).name for p in audit.opened) == ["config.toml", "study.toml"]
    assert audit.connections == []

    # Naming one, the coordinator reads that manifest and its files, and nothing else.
    manifest, test = _test_manifest(tmp_path / "test-set", count=4)
    study = _study(tmp_path, test_manifest="test-set/manifest.csv")
    with audited(watched) as audit:
        run = deployment_server_run(_context(study, tmp_path / "run2"))
    assert len(run.test_set.labels) == len(test)
    assert run.records.test_set["usable_rows"] == 4
    read = {Path(p) for p in audit.opened} - {study, tmp_path / "run2" / "config.toml"}
    assert read and all(p.is_relative_to(manifest.parent) for p in read)
