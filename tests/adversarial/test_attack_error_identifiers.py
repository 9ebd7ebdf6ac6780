"""Attack: read patient identifiers out of a hospital's error replies.

A real DICOM site whose folder and manifest name a patient, with one unreadable file: the site
check fails with a message naming the file. The coordinator's view - the error reply, and the
``metrics.csv`` its round loop writes - must carry a category and counts, never the path or the
name; the details stay in the hospital's own log.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from client.app import build_client_app
from client.site import SiteData, load_site_from_node_config
from models.adapters import adapter_state
from models.config import TrainConfig, to_config_record
from models.lora import build_lora_model
from simulations.dicom_export import export_site
from simulations.inprocess import coordinator_message

PATIENT = "Jane_Doe_1961"


@pytest.fixture
def hostile_site(tmp_path, pneumonia_small) -> dict:
    pool = pneumonia_small.splits["train"]
    site = SiteData(train=pool.subset(np.arange(20)), val=pool.subset(np.arange(20, 26)))
    manifest = export_site(site, tmp_path / f"scans-of-{PATIENT}", hospital=0,
                           classes=["normal", "pneumonia"])
    broken = sorted((manifest.parent / "images").glob("*.dcm"))[0]
    broken.write_bytes(b"not a DICOM file")
    return {"manifest": str(manifest), "classes": "normal,pneumonia",
            "site-cache-dir": str(tmp_path / "cache"), "site-max-error-fraction": 0.0,
            "partition-id": 0}


def test_error_reply_carries_a_category_not_the_path(hostile_site, small_model_config, caplog):
    context = Context(run_id=1, node_id=7, node_config=hostile_site, state=RecordDict(),
                      run_config={})
    with pytest.raises(ValueError, match=PATIENT):  # what the hospital's operator sees
        load_site_from_node_config(context, small_model_config.image_size)
    torch.manual_seed(0)
    arrays = ArrayRecord(adapter_state(build_lora_model(small_model_config)))
    config = to_config_record(small_model_config, TrainConfig(local_steps=1, batch_size=8))
    config["server-round"] = 1
    with caplog.at_level(logging.ERROR):
        reply = build_client_app(load_site_from_node_config)(
            coordinator_message("train", arrays, config), context)
    assert reply.has_error() and reply.error.reason.startswith("site-data:")
    assert PATIENT not in reply.error.reason and ".dcm" not in reply.error.reason
    assert "/" not in reply.error.reason.split(";")[0]
    assert PATIENT in caplog.text  # the details stay in the hospital's own log


def test_coordinators_metrics_csv_holds_no_identifier(tmp_path, hostile_site):
    """The coordinator's real round loop, in-process: the refusal lands in metrics.csv as a
    category only."""
    from models.config import ModelConfig
    from models.registry import weights_sha256
    from server.config import FederationConfig
    from server.records import RunRecords
    from server.rounds import FederationError, run_federation
    from simulations.config import DataConfig
    from simulations.inprocess import InProcessGrid
    from simulations.sites import held_out_test_set

    model_config = ModelConfig(image_size=32, lora_r=4, lora_alpha=8, num_classes=2,
                               weights_sha256=weights_sha256("efficientnet-lite0-imagenet"))
    grid = InProcessGrid(build_client_app(load_site_from_node_config), {7: hostile_site})
    records = RunRecords(tmp_path / "run")
    federation = FederationConfig(rounds=1, min_hospitals=1, fraction_evaluate=0.0)
    with pytest.raises(FederationError):
        run_federation(grid, federation, model_config, TrainConfig(local_steps=1, batch_size=8),
                       held_out_test_set(DataConfig(max_test_examples=20), 32, 0), records)
    written = (tmp_path / "run" / "metrics.csv").read_text()
    assert "site-data:" in written
    assert PATIENT not in written and ".dcm" not in written
