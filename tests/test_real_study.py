"""A study as a new consortium runs it, end to end on real components: three hospitals with
DICOM files whose manifests use class names (one declares them in another order), a fourth
whose classes the study does not have, and a coordinator whose data folder is empty.

The coordinator reads the study file, each hospital runs medfed's ClientApp on the node config
its ``hospital.toml`` gives (manifest, classes, ``[site_data]``), in this process. Three rounds:
the run directory holds each hospital's and the combined evaluation, the published round and a
PEFT adapter; the coordinator opened no MedMNIST file, and ``medfed report`` reads the run
without re-scoring it. Slow: a few minutes of CPU training.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
import tomli_w

from client.audit import read_audit_log
from client.site_folder import CONFIG_FILE
from simulations.bench.real_study import STUDY, audited, prepare_hospitals, run_coordinator
from simulations.datasets import search_dirs


def _rename_class(site: Path, old: str, new: str) -> None:
    """Hospital ``site`` calls class ``old`` ``new``, in its manifest and its hospital.toml."""
    manifest = site / "data" / "manifest.csv"
    rows = list(csv.DictReader(manifest.open()))
    for row in rows:
        row["label"] = new if row["label"] == old else row["label"]
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = (site / CONFIG_FILE).read_text().replace(f'"{old}"', f'"{new}"')
    (site / CONFIG_FILE).write_text(text)


@pytest.mark.slow
def test_a_study_on_dicom_hospitals_with_a_coordinator_that_holds_no_data(tmp_path):
    sites = prepare_hospitals(tmp_path, hospitals=4, train_per_hospital=40, image_size=32)
    _rename_class(sites[3], "pneumonia", "covid")  # a class the study does not have
    study = STUDY | {"federation": STUDY["federation"] | {"rounds": 3, "min_hospitals": 3}}
    study_file = tmp_path / "study.toml"
    study_file.write_text(tomli_w.dumps(study))
    data_dir = tmp_path / "coordinator-data"
    data_dir.mkdir()
    run_dir = tmp_path / "run"

    summary, audit = run_coordinator(study_file, sites, run_dir, data_dir)

    assert audit.opened == [] and audit.connections == []
    assert list(data_dir.iterdir()) == []  # nothing downloaded into it
    metrics = pd.read_csv(run_dir / "metrics.csv", dtype={"hospital": str})
    hospitals = metrics[metrics.hospital != "global"]
    combined = metrics[(metrics.hospital == "global") & (metrics["round"] > 0)]
    assert sorted(combined["round"]) == [1, 2, 3]
    assert metrics["test_auc"].isna().all()  # the coordinator held no test set
    for server_round in (1, 2, 3):
        evaluated = hospitals[(hospitals["round"] == server_round)
                              & hospitals.val_examples.notna()]
        assert sorted(evaluated.hospital) == ["1", "2", "3"]
        row = combined[combined["round"] == server_round].iloc[0]
        assert row.val_examples == evaluated.val_examples.sum()
        for name in ("auc", "accuracy", "balanced_accuracy", "loss"):
            weighted = (evaluated[f"val_{name}"] * evaluated.val_examples).sum() / \
                evaluated.val_examples.sum()
            assert row[f"val_{name}"] == pytest.approx(weighted)
        # The hospital whose classes do not fit refused every message, with its reason.
        refused = hospitals[(hospitals["round"] == server_round) & (hospitals.hospital == "4")]
        assert "not among the study's classes" in refused.iloc[0].error
    entries = read_audit_log(sites[3] / "egress-audit.jsonl")
    assert entries and all("not among the study's classes" in str(e["error"]) for e in entries)

    published = summary["published"]["round"]
    best = combined.sort_values(["val_auc", "round"]).iloc[-1]
    assert published == best["round"] and summary["validation"]["auc"] == best.val_auc
    assert sorted(summary["validation_per_hospital"]) == ["1", "2", "3"]
    assert summary["classes"] == ["normal", "pneumonia"] and "federated" not in summary
    assert json.loads((run_dir / "summary.json").read_text())["published"]["round"] == published
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (run_dir / "adapter"
                                             / "adapter_model.safetensors").is_file()

    # The report reads the deployed run from its own files: nothing re-scored on MedMNIST.
    from simulations.report import build_report

    with audited([d for d in search_dirs() if d.is_dir()]) as report_audit:
        page = build_report([run_dir], tmp_path / "report")
    assert report_audit.opened == [] and page.is_file()


@pytest.mark.slow
def test_a_coordinator_test_set_is_scored_every_round_and_reported(tmp_path):
    """The study names a coordinator-held DICOM test set: the coordinator reads it through the
    hospitals' reader (and nothing under the MedMNIST folders), scores every round's adapter
    on it, and the run directory and the report carry the scores."""
    from simulations.bench.real_study import run_real_study

    summary, audit = run_real_study(tmp_path, hospitals=2, rounds=2, train_per_hospital=24,
                                    test_images=32)
    assert audit.opened == [] and audit.connections == []
    run_dir = tmp_path / "run"
    metrics = pd.read_csv(run_dir / "metrics.csv", dtype={"hospital": str})
    scored = metrics[metrics.hospital == "global"].set_index("round")
    assert sorted(scored.index) == [0, 1, 2] and scored.test_auc.notna().all()
    published = summary["published"]["round"]
    assert summary["federated"]["auc"] == pytest.approx(scored.test_auc[published])
    assert summary["test_auc_per_round"] == pytest.approx(list(scored.test_auc))
    held = summary["test_set"]
    assert held["usable_rows"] == held["rows"] == 32 and held["rows_left_out"] == 0
    assert sum(held["images"].values()) == 32 and set(held["images"]) == {"normal", "pneumonia"}

    from simulations.report import build_report

    page = build_report([run_dir], tmp_path / "report").read_text()
    assert "coordinator&#x27;s own test set" in page or "coordinator's own test set" in page
    assert f"{summary['federated']['auc']:.3f}" in page
