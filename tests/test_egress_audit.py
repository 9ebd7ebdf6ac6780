"""The hospital's egress audit log lists exactly what each reply carries."""


import os
import stat

import pytest
import tomli_w
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.app import build_client_app
from client.audit import payload_sha256, read_audit_log, verify_audit_log
from models.adapters import adapter_state
from models.config import TrainConfig, to_config_record
from models.lora import build_lora_model
from privacy.secagg.wire import RECORD
from simulations.inprocess import coordinator_message, message_with_metadata


def _message(kind: str, arrays: ArrayRecord, config) -> Message:
    return coordinator_message(kind, arrays, config, run_id=5, group_id="2")


SITE = (48, 24, 0)  # the conftest ``site`` fixture: train, val images, seed


def _context(node_config) -> Context:
    return Context(run_id=5, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={})


def test_audit_log_lists_exactly_what_left(tmp_path, site, small_model_config):
    log = tmp_path / "audit" / "egress.jsonl"
    app = build_client_app(lambda context, image_size: site)
    context = _context({"partition-id": 2, "audit-log": str(log)})
    torch.manual_seed(0)
    arrays = ArrayRecord(adapter_state(build_lora_model(small_model_config)))
    config = to_config_record(small_model_config, TrainConfig(local_steps=2, batch_size=16))
    config["server-round"] = 2
    replies = [app(_message("train", arrays, config), context),
               app(_message("evaluate", arrays, config), context)]
    entries = read_audit_log(log)
    assert len(entries) == 2
    for reply, entry in zip(replies, entries, strict=True):
        assert not reply.has_error()
        assert entry["run_id"] == 5 and entry["round"] == 2
        assert entry["message_type"] == reply.metadata.message_type
        sent = [(r, k, a) for r, rec in reply.content.array_records.items()
                for k, a in rec.items()]
        assert [(t["record"], t["name"], tuple(t["shape"]), t["dtype"], t["bytes"])
                for t in entry["tensors"]] == [(r, k, tuple(a.shape), a.dtype, len(a.data))
                                               for r, k, a in sent]
        assert entry["tensor_bytes"] == sum(len(a.data) for _, _, a in sent)
        assert entry["payload_sha256"] == payload_sha256(reply)
        assert entry["metrics"] == {name: dict(rec.items())
                                    for name, rec in reply.content.metric_records.items()}
        assert set(entry["configs"]) == set(reply.content.config_records)
    train, evaluate = entries
    assert {t["name"] for t in train["tensors"]} == set(arrays)  # the adapter, nothing else
    assert evaluate["tensors"] == [] and "val-auc" in evaluate["metrics"]["metrics"]
    assert train["privacy"] == {}  # no DP in this run
    # The hash changes with any byte of the payload.
    assert train["payload_sha256"] != payload_sha256(_message("train", arrays, config))


def test_no_audit_log_unless_configured(tmp_path, site, small_model_config, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = build_client_app(lambda context, image_size: site)
    torch.manual_seed(0)
    arrays = ArrayRecord(adapter_state(build_lora_model(small_model_config)))
    config = to_config_record(small_model_config, TrainConfig())
    config["server-round"] = 1
    reply = app(_message("evaluate", arrays, config), _context({"partition-id": 0}))
    assert not reply.has_error() and "val-auc" in reply.content["metrics"]
    assert list(tmp_path.iterdir()) == []  # nothing written without 'audit-log'
    # The same message with 'audit-log' set: one chained 0600 line for the same reply.
    log = tmp_path / "egress.jsonl"
    again = app(_message("evaluate", arrays, config),
                _context({"partition-id": 0, "audit-log": str(log)}))
    [entry] = read_audit_log(log)
    assert entry["metrics"] == {"metrics": dict(again.content["metrics"].items())}
    assert entry["prev_sha256"] == "0" * 64
    assert verify_audit_log(log).ok and verify_audit_log(log).lines == 1
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600


@pytest.mark.parametrize("policy, reason", [
    ('allowed_weights_sha256 = ["' + "0" * 64 + '"]\n', "allow-list"),
    ('allowed_backbones = ["hf:/srv/models/vit"]\n', "backbone"),
    ("min_hospitals = 3\n", "requires 3"),
    ('allowed_tasks = ["pneumonia-cxr"]\n', "task '(undeclared)' is not allowed"),
])
def test_run_policy_refuses_before_any_work_and_the_refusal_is_audited(
        tmp_path, site, small_model_config, policy, reason):
    # Allowed but for the rule under test (an empty list allows nothing).
    base = {"allowed_backbones": ["efficientnet-lite0-imagenet"], "allowed_tasks": [""]}
    (tmp_path / "run-policy.toml").write_text(
        tomli_w.dumps({k: v for k, v in base.items() if k not in policy}) + policy)
    log = tmp_path / "egress.jsonl"
    trained = []
    app = build_client_app(lambda context, image_size: trained.append(1) or site)
    context = _context({"partition-id": 0, "run-policy": str(tmp_path / "run-policy.toml"),
                        "audit-log": str(log)})
    torch.manual_seed(0)
    arrays = ArrayRecord(adapter_state(build_lora_model(small_model_config)))
    config = to_config_record(small_model_config, TrainConfig())
    config["server-round"] = 1
    config["min-hospitals"] = 2
    reply = app(_message("train", arrays, config), context)
    assert reply.has_error() and reason in reply.error.reason
    assert trained == []  # the site's data was never loaded
    (entry,) = read_audit_log(log)
    assert entry["tensors"] == [] and entry["metrics"] == {}
    assert reason in entry["error"]["reason"]


def test_run_policy_allows_a_matching_run(tmp_path, site, small_model_config):
    (tmp_path / "run-policy.toml").write_text(
        f'allowed_weights_sha256 = ["{small_model_config.weights_sha256}"]\nmin_hospitals = 2\n'
        'allowed_tasks = ["pneumonia-cxr"]\nallowed_backbones = ["efficientnet-lite0-imagenet"]\n')
    app = build_client_app(lambda context, image_size: site)
    torch.manual_seed(0)
    arrays = ArrayRecord(adapter_state(build_lora_model(small_model_config)))
    config = to_config_record(small_model_config, TrainConfig())
    config["server-round"] = 1
    config["min-hospitals"] = 2
    config["task"] = "pneumonia-cxr"
    reply = app(_message("evaluate", arrays, config),
                _context({"partition-id": 0, "run-policy": str(tmp_path / "run-policy.toml")}))
    assert not reply.has_error()


def test_a_failure_in_local_training_is_an_audited_error_reply(tmp_path, small_model_config):
    log = tmp_path / "egress.jsonl"

    def unreachable_data(context, image_size):
        raise OSError("site data volume not mounted")

    app = build_client_app(unreachable_data)
    context = _context({"partition-id": 0, "audit-log": str(log)})
    arrays = ArrayRecord(adapter_state(build_lora_model(small_model_config)))
    config = to_config_record(small_model_config, TrainConfig(local_steps=1, batch_size=16))
    config["server-round"] = 3
    reply = app(_message("train", arrays, config), context)  # answers instead of raising
    # A category for the coordinator; the message (it may name files) stays at the hospital.
    assert reply.has_error() and reply.error.reason.startswith("local-io: OSError")
    assert "site data volume" not in reply.error.reason
    [entry] = read_audit_log(log)
    assert entry["round"] == 3 and entry["message_type"] == "train"
    assert entry["error"] == {"code": reply.error.code, "reason": reply.error.reason}
    assert entry["tensors"] == [] and entry["tensor_bytes"] == 0
    # The same ClientApp serves the next message (the daemon is not brought down).
    assert app(_message("evaluate", arrays, config), context).has_error()
    assert len(read_audit_log(log)) == 2 and verify_audit_log(log).ok


def test_secure_aggregation_stages_are_audited_under_their_round(tmp_path, site):
    """A SecAgg+ stage after setup carries no training config; its audit line still names the
    round its request gives (here a 'share' the hospital refuses: no setup came first)."""
    log = tmp_path / "egress.jsonl"
    app = build_client_app(lambda context, image_size: site)
    request = message_with_metadata(
        "train.secagg", RecordDict({RECORD: ConfigRecord({"stage": "share", "round": 4})}),
        run_id=5, group_id="4")
    reply = app(request, _context({"partition-id": 0, "audit-log": str(log)}))
    assert reply.has_error()  # out of order: refused, and still audited
    [entry] = read_audit_log(log)
    assert entry["round"] == 4 and entry["error"]
    assert verify_audit_log(log).ok
