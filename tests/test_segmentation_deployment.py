"""A segmentation study on Flower's deployment engine on loopback: one ``medfed coordinator
start --study`` and three ``medfed hospital start`` daemons (TLS, node authentication), each
hospital holding real hippocampus NIfTI cases in its site folder, its class names in
``hospital.toml``. One round under SecAgg+ with client-level DP; judged from the run directory
and the hospitals' audit logs. Slow: real processes, LiteMedSAM built in each of them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from client.audit import read_audit_log
from privacy.secagg import SecAggConfig
from simulations.bench.deploy import LoopbackConsortium
from simulations.scenarios import load_scenario
from simulations.segmentation_study import loopback_site

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is not here")]


@pytest.fixture
def consortium(tmp_path):
    config = load_scenario("hippocampus-segmentation", {
        "data": {"num_hospitals": 3, "max_train_examples": 3},
        "train": {"local_steps": 2, "batch_size": 1},
        "segmentation": {"train_slices_per_case": 1, "eval_slices_per_case": 1},
        "privacy": {"update_clip_norm": 0.5, "update_noise_multiplier": 0.5}})
    config = replace(config, federation=replace(
        config.federation, rounds=1, min_hospitals=3, round_timeout_s=900.0,
        secure_aggregation=SecAggConfig(enabled=True)))
    loopback = LoopbackConsortium(tmp_path, config, site_writer=loopback_site)
    yield loopback
    loopback.stop_all()


def test_a_segmentation_round_under_secagg_and_client_dp_on_three_daemons(consortium):
    lc = consortium
    code = lc.run(timeout_s=1500)
    log = lc.log("coordinator").read_text(errors="replace")
    assert code == 0, log[-4000:]
    metrics = pd.read_csv(lc.run_dir / "metrics.csv", dtype={"hospital": str})
    rows = metrics[(metrics.hospital != "global") & (metrics["round"] == 1)]
    assert len(rows) == 3 and rows.epsilon.notna().all()  # every hospital charged client DP
    assert rows.train_loss.isna().all()  # a private round withholds the loss
    assert rows.val_dice.between(0, 1).all() and (rows.val_hd95 >= 0).all()
    card = json.loads((lc.run_dir / "adapter" / "card.json").read_text())
    assert card["task"] == "segmentation" and card["secure_aggregation"] is True
    assert card["privacy"]["update_dp"] is True
    for site in lc.sites:  # the masked update and the metrics left through the audit log
        kinds = {e["message_type"] for e in read_audit_log(site / "egress-audit.jsonl")}
        assert {"train.secagg", "evaluate"} <= kinds, kinds
