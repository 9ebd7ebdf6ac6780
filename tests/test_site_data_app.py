"""A hospital daemon reading its DICOM manifest through the node config, end to end in-process:
the simulated partition exported as DICOM reads back exactly, the train reply carries the
dataset fingerprint and counts (no ids or paths), and the run records keep the fingerprint."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict

from client.app import build_client_app
from client.site import SiteData, load_site_from_node_config
from models.adapters import adapter_state
from models.config import TrainConfig, to_config_record
from models.lora import build_lora_model
from server.records import RunRecords
from simulations.dicom_export import export_site
from simulations.inprocess import coordinator_message
from strategies.replies import split_valid_replies


def _message(arrays: ArrayRecord, config) -> Message:
    return coordinator_message("train", arrays, config)


def test_dicom_site_trains_and_reports_only_fingerprint_and_counts(
        tmp_path, pneumonia_small, small_model_config):
    pool = pneumonia_small.splits["train"]
    rng = np.random.default_rng(0)
    picked = rng.choice(len(pool), 40, replace=False)
    site = SiteData(train=pool.subset(picked[:32]), val=pool.subset(picked[32:]))
    manifest = export_site(site, tmp_path / "site", hospital=2, classes=["normal", "pneumonia"])
    node_config = {"manifest": str(manifest), "classes": "normal,pneumonia",
                   "site-cache-dir": str(tmp_path / "cache"), "partition-id": 2}
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config={})

    loaded = load_site_from_node_config(context, small_model_config.image_size)
    # Same images and labels as the simulation holds, up to the 8-bit quantisation of the export.
    assert (loaded.train.images - site.train.images).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.equal(loaded.train.labels, site.train.labels)
    assert torch.equal(loaded.val.labels, site.val.labels)

    torch.manual_seed(0)
    arrays = ArrayRecord(adapter_state(build_lora_model(small_model_config)))
    config = to_config_record(small_model_config, TrainConfig(local_epochs=1, batch_size=16))
    config["server-round"] = 1
    reply = build_client_app(load_site_from_node_config)(_message(arrays, config), context)
    assert not reply.has_error()
    shared = dict(reply.content.config_records["site"])
    assert shared["train-images"] == 32 and shared["val-images"] == 8
    assert shared["fingerprint"] == loaded.info["fingerprint"]
    leaked = pd.read_csv(manifest)
    text = repr(shared)
    assert not any(p in text for p in leaked["patient_id"]) and ".dcm" not in text

    # The coordinator's records keep the fingerprint next to the round's other numbers.
    records = RunRecords(tmp_path / "run")
    valid = split_valid_replies([reply], 1, "train", arrays, records.add_reply)
    assert len(valid) == 1
    records.write_metrics()
    row = pd.read_csv(tmp_path / "run" / "metrics.csv", dtype={"hospital": str}).iloc[0]
    assert row["site_fingerprint"] == shared["fingerprint"]


def test_simulated_hospitals_read_their_partition_as_dicom(tmp_path):
    from simulations.config import DataConfig
    from simulations.sites import hospital_sites, simulated_site_loader

    data = DataConfig(num_hospitals=2, max_train_examples=60, as_dicom=True)
    loader = simulated_site_loader(data, 32, 0, str(tmp_path))
    assert (tmp_path / "dicom" / "hospital-1" / "manifest.csv").is_file()
    in_memory = hospital_sites(data, 32, 0)
    for hospital in (0, 1):
        context = Context(run_id=1, node_id=hospital + 1,
                          node_config={"partition-id": hospital}, state=RecordDict(),
                          run_config={})
        site = loader(context, 32)
        for split in ("train", "val"):
            ours, theirs = getattr(site, split), getattr(in_memory[hospital], split)
            assert torch.equal(ours.labels, theirs.labels)
            assert (ours.images - theirs.images).abs().max() <= 0.5 / 255 + 1e-6
        assert site.info["train-images"] == len(in_memory[hospital].train)
