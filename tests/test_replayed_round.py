"""A round sent again after a coordinator restart is not charged twice (issue #34, item 2).

The real ClientApp, a site privacy policy and ledger, DP-SGD on real PneumoniaMNIST images. The
site's budget affords one round. A coordinator killed after sending round 1 resumes from its
checkpoint and sends round 1 again under the same run key (a new Flower run id, a restarted
hospital app): the hospital answers with the reply it already released, byte for byte, and the
ledger holds the round once, within the budget. A replay it cannot answer that way (another
global adapter, or its kept reply lost) is refused, never trained and released a second time.
"""

from __future__ import annotations

import shutil

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from client.app import build_client_app
from client.audit import read_audit_log
from client.privacy_round import REFUSAL_CODE, RUN_KEY, SitePrivacy
from client.released_rounds import release_folder
from models.adapters import adapter_state
from models.config import TrainConfig, to_config_record
from models.lora import build_lora_model
from privacy.accounting import epsilon
from privacy.config import DPConfig
from privacy.ledger import Ledger
from privacy.policy import SitePolicy
from server.rounds import RUN_NONCE_FILE, run_key_for
from simulations.inprocess import coordinator_message

KEY = "3f1c0de5a1b2c3d4e5f60718293a4b5c"
TRAIN = TrainConfig(local_epochs=1, batch_size=16, lr=1e-3)
DP = DPConfig(dpsgd=True, dp_noise_multiplier=1.0, dp_run_rounds=3)


def _budget(site) -> float:
    """Between one round's epsilon and two rounds': the site affords exactly one."""
    q, steps = 16 / len(site.train), int(len(site.train) / 16)
    return (epsilon([(1.0, q, steps)], 1e-5) + epsilon([(1.0, q, steps)] * 2, 1e-5)) / 2


def _send(site, model_config, tmp_path, run_id: int, seed: int = 0):
    """Round 1 of run ``KEY`` to a freshly started hospital app (its ledger on disk), with the
    global adapter drawn from ``seed``; returns the reply."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    privacy = SitePrivacy(policy=SitePolicy(max_epsilon=_budget(site)), ledger=ledger,
                          dataset_id="st-mary-cxr")
    app = build_client_app(lambda context, image_size: site, lambda context: privacy)
    torch.manual_seed(seed)
    arrays = ArrayRecord(adapter_state(build_lora_model(model_config)))
    config = to_config_record(model_config, TRAIN, DP)
    config["server-round"], config[RUN_KEY] = 1, KEY
    context = Context(run_id=run_id, node_id=7, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, "audit-log": str(tmp_path / "audit.jsonl")})
    return app(coordinator_message("train", arrays, config, run_id=run_id), context)


def _charged_rounds(tmp_path) -> list[tuple[str, int]]:
    return [(r.run_id, r.server_round) for r in Ledger(tmp_path / "ledger.sqlite").rows()]


def test_a_replayed_round_gets_the_same_release_and_no_second_charge(site, small_model_config,
                                                                     tmp_path):
    first = _send(site, small_model_config, tmp_path, run_id=5)
    assert not first.has_error(), first.error
    assert _charged_rounds(tmp_path) == [(KEY, 1)]

    # The coordinator restarted: a new Flower run, the same run key and round.
    again = _send(site, small_model_config, tmp_path, run_id=6)
    assert not again.has_error(), again.error
    assert _charged_rounds(tmp_path) == [(KEY, 1)]  # charged once
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert ledger.rows()[-1].epsilon_total <= _budget(site)
    old, new = first.content["arrays"], again.content["arrays"]
    assert list(old) == list(new)
    assert all(np.array_equal(old[k].numpy(), new[k].numpy()) for k in old)
    assert dict(first.content["metrics"]) == dict(again.content["metrics"])
    # Both replies are in the egress audit log, and they carried the same bytes.
    entries = [e for e in read_audit_log(tmp_path / "audit.jsonl") if not e["error"]]
    assert [e["run_id"] for e in entries] == [5, 6]
    assert entries[0]["payload_sha256"] == entries[1]["payload_sha256"]


def test_a_replay_that_cannot_be_answered_as_released_is_refused(site, small_model_config,
                                                                 tmp_path):
    assert not _send(site, small_model_config, tmp_path, run_id=5).has_error()
    # The same round on another global adapter: not trained again.
    other = _send(site, small_model_config, tmp_path, run_id=6, seed=1)
    assert other.has_error() and other.error.code == REFUSAL_CODE
    assert "already trained here" in other.error.reason
    # The kept reply lost (a crash between the ledger entry and keeping it): refused too.
    shutil.rmtree(release_folder(Ledger(tmp_path / "ledger.sqlite")))
    lost = _send(site, small_model_config, tmp_path, run_id=7)
    assert lost.has_error() and "was not kept" in lost.error.reason
    assert _charged_rounds(tmp_path) == [(KEY, 1)]


def test_the_run_key_survives_a_crash_and_changes_for_a_run_started_afresh(tmp_path):
    """A resumed run (crashed at any point, round 1 included) keeps its run key, so its replays
    are recognised; a finished study run again in the same directory gets a new one, so its
    rounds are new releases, charged as such."""
    first = run_key_for(tmp_path, "settings")
    assert len(first) == 32
    assert run_key_for(tmp_path, "settings") == first
    assert run_key_for(tmp_path, "other settings") != first
    (tmp_path / RUN_NONCE_FILE).unlink()  # what a finished run does
    assert run_key_for(tmp_path, "settings") != first
