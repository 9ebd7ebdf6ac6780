"""Attack: reset a dataset's privacy budget by deleting or editing the ledger, or by changing
what the old fingerprint hashed (the image size, one more patient).

Each attack runs through the real ClientApp with the hospital's node config (site policy,
SQLite ledger, declared dataset id) and asserts the hospital refuses to train.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from client.app import build_client_app
from client.privacy_round import dataset_fingerprint
from client.site import SiteData
from models.adapters import adapter_state
from models.config import TrainConfig, to_config_record
from models.data import ImageSet
from models.lora import build_lora_model
from privacy.accounting import epsilon
from privacy.config import DPConfig
from privacy.ledger import Ledger, LedgerIntegrityError
from simulations.inprocess import coordinator_message

Z = 4.0  # update noise multiplier, one hospital: example-level z / 2 = 2 per round
DP = DPConfig(update_clip_norm=0.05, update_noise_multiplier=Z, update_hospitals=1)


@pytest.fixture(scope="module")
def pool(pneumonia_small):
    return pneumonia_small.splits["train"]


def _site(pool, count: int) -> SiteData:
    keep = np.arange(count)
    return SiteData(train=pool.subset(keep), val=pool.subset(np.arange(100, 108)))


def _resized(site: SiteData, size: int) -> SiteData:
    def resize(images: ImageSet) -> ImageSet:
        return ImageSet(torch.nn.functional.interpolate(images.images, size=(size, size),
                                                        mode="bilinear"), images.labels)
    return SiteData(train=resize(site.train), val=resize(site.val))


def _node_config(tmp_path, **extra) -> dict:
    policy = tmp_path / "privacy-policy.toml"
    # Room for one round at example-level z = 2, not for two.
    one_round = epsilon([(Z / 2, 1.0, 1)], 1e-5, "rdp")
    policy.write_text(f"max_epsilon = {1.2 * one_round}\ndelta = 1e-5\naccountant = \"rdp\"\n")
    return {"partition-id": 0, "privacy-policy": str(policy),
            "privacy-ledger": str(tmp_path / "ledger.sqlite"), "dataset-id": "cxr-2026"} | extra


def _round(site: SiteData, node_config: dict, model_config, server_round: int):
    app = build_client_app(lambda context, image_size: site)
    context = Context(run_id=server_round, node_id=7, node_config=node_config,
                      state=RecordDict(), run_config={})
    torch.manual_seed(0)
    arrays = ArrayRecord(adapter_state(build_lora_model(model_config)))
    config = to_config_record(model_config, TrainConfig(local_steps=1, batch_size=16), DP)
    config["server-round"] = server_round
    return app(coordinator_message("train", arrays, config), context)


def test_deleting_the_ledger_does_not_reset_the_budget(tmp_path, pool, small_model_config,
                                                       caplog):
    node_config = _node_config(tmp_path)
    first = _round(_site(pool, 48), node_config, small_model_config, 1)
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    ledger = tmp_path / "ledger.sqlite"
    for path in (ledger, tmp_path / "ledger.sqlite.anchor"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    ledger.unlink()  # the attack
    with caplog.at_level(logging.ERROR):
        again = _round(_site(pool, 48), node_config, small_model_config, 2)
    assert again.has_error() and again.error.reason.startswith("privacy-ledger:")
    assert "ledger.sqlite" not in again.error.reason  # the path stays at the hospital
    assert str(ledger) in caplog.text and "deleted" in caplog.text  # its operator is told
    assert not ledger.exists()  # no fresh, empty ledger was made behind the operator's back


def test_an_edited_row_is_detected(tmp_path, pool, small_model_config):
    node_config = _node_config(tmp_path)
    assert not _round(_site(pool, 48), node_config, small_model_config, 1).has_error()
    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as conn:  # the attack: make the round look nearly free
        conn.execute("UPDATE rounds SET noise_multiplier = 1000.0, epsilon_total = 0.001")
    with pytest.raises(LedgerIntegrityError, match="row 1 was edited"):
        Ledger(path)
    reply = _round(_site(pool, 48), node_config, small_model_config, 2)
    assert reply.has_error() and reply.error.reason.startswith("privacy-ledger:")


def test_a_removed_last_row_is_detected(tmp_path, pool, small_model_config):
    node_config = _node_config(tmp_path)
    assert not _round(_site(pool, 48), node_config, small_model_config, 1).has_error()
    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM rounds")
    with pytest.raises(LedgerIntegrityError, match="rows were removed"):
        Ledger(path)


@pytest.mark.parametrize("change", ["one-more-patient", "image-size"])
def test_changing_the_data_keeps_the_same_budget(tmp_path, pool, small_model_config, change):
    from dataclasses import replace

    node_config = _node_config(tmp_path)
    site = _site(pool, 48)
    assert not _round(site, node_config, small_model_config, 1).has_error()
    if change == "one-more-patient":
        changed, model_config = _site(pool, 49), small_model_config
    else:
        changed = _resized(site, 28)
        model_config = replace(small_model_config, image_size=28)
    # What the old key hashed differs: it would have opened a fresh budget.
    assert dataset_fingerprint(changed.train) != dataset_fingerprint(site.train)
    reply = _round(changed, node_config, model_config, 2)
    assert reply.has_error() and "past the site budget" in reply.error.reason
    rows = Ledger(tmp_path / "ledger.sqlite").rows()
    assert [r.dataset_id for r in rows] == ["cxr-2026"]  # one round, under the declared id


def test_a_private_round_without_a_declared_dataset_id_is_refused(tmp_path, pool,
                                                                  small_model_config):
    node_config = _node_config(tmp_path)
    del node_config["dataset-id"]
    reply = _round(_site(pool, 48), node_config, small_model_config, 1)
    assert reply.has_error() and "dataset_id in hospital.toml" in reply.error.reason
    assert Ledger(tmp_path / "ledger.sqlite").rows() == []
