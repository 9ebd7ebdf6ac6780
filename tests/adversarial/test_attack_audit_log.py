"""Attack: hide what left the hospital by editing, deleting or truncating its egress audit log,
or by sending replies that are never logged (error replies, secure-aggregation stages)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from client.app import build_client_app
from client.audit import read_audit_log, verify_audit_log
from client.site import SiteData
from models.adapters import adapter_state
from models.config import TrainConfig, to_config_record
from models.lora import build_lora_model
from simulations.inprocess import coordinator_message


@pytest.fixture(scope="module")
def site(pneumonia_small):
    train = pneumonia_small.splits["train"]
    rng = np.random.default_rng(3)
    return SiteData(train=train.subset(rng.choice(len(train), 16, replace=False)),
                    val=train.subset(rng.choice(len(train), 8, replace=False)))


@pytest.fixture
def log(tmp_path, site, small_model_config):
    """A real audit log of four evaluate replies."""
    path = tmp_path / "egress.jsonl"
    app = build_client_app(lambda context, image_size: site)
    context = Context(run_id=4, node_id=7, node_config={"partition-id": 0,
                                                        "audit-log": str(path)},
                      state=RecordDict(), run_config={})
    torch.manual_seed(0)
    arrays = ArrayRecord(adapter_state(build_lora_model(small_model_config)))
    config = to_config_record(small_model_config, TrainConfig())
    for server_round in range(1, 5):
        config["server-round"] = server_round
        assert not app(coordinator_message("evaluate", arrays, config), context).has_error()
    assert verify_audit_log(path).ok and verify_audit_log(path).lines == 4
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    return path


def _lines(path):
    return path.read_text().splitlines(keepends=True)


def test_an_edited_line_fails_verification_at_that_line(log):
    lines = _lines(log)
    entry = json.loads(lines[1])
    entry["metrics"]["metrics"]["num-examples"] = 0  # the attack: rewrite what left
    lines[1] = json.dumps(entry) + "\n"
    log.write_text("".join(lines))
    check = verify_audit_log(log)
    assert not check.ok and check.broken_line == 2 and "edited" in check.reason


def test_an_edited_line_with_its_hash_recomputed_breaks_the_chain(log):
    import hashlib

    lines = _lines(log)
    entry = json.loads(lines[1])
    entry["tensor_bytes"] = 1
    entry.pop("sha256")
    entry["sha256"] = hashlib.sha256(json.dumps(entry).encode()).hexdigest()
    lines[1] = json.dumps(entry) + "\n"
    log.write_text("".join(lines))
    check = verify_audit_log(log)
    assert not check.ok and check.broken_line == 3


def test_a_deleted_line_fails_verification_where_it_was(log):
    lines = _lines(log)
    del lines[1]
    log.write_text("".join(lines))
    check = verify_audit_log(log)
    assert not check.ok and check.broken_line == 2 and "removed" in check.reason


def test_lines_cut_off_the_end_are_detected(log):
    log.write_text("".join(_lines(log)[:2]))
    check = verify_audit_log(log)
    assert not check.ok and "cut off the end" in check.reason


def test_an_error_reply_is_logged(tmp_path, small_model_config):
    path = tmp_path / "egress.jsonl"

    def broken(context, image_size):
        raise RuntimeError("/data/Jane_Doe/1.dcm unreadable")

    app = build_client_app(broken)
    context = Context(run_id=4, node_id=7, node_config={"partition-id": 0,
                                                        "audit-log": str(path)},
                      state=RecordDict(), run_config={})
    arrays = ArrayRecord(adapter_state(build_lora_model(small_model_config)))
    config = to_config_record(small_model_config, TrainConfig())
    config["server-round"] = 1
    for kind in ("train", "evaluate"):
        reply = app(coordinator_message(kind, arrays, config), context)
        assert reply.has_error() and "Jane_Doe" not in reply.error.reason
    entries = read_audit_log(path)
    assert [e["message_type"] for e in entries] == ["train", "evaluate"]
    assert all(e["error"]["reason"].startswith("local-failure: RuntimeError") for e in entries)
    assert verify_audit_log(path).ok


def test_every_secure_aggregation_stage_is_logged(tmp_path):
    """A real securely aggregated round (three hospitals, real ClientApp, in-process grid):
    each hospital's log has one line per stage it answered, and each log verifies."""
    from dataclasses import replace

    from models.config import ModelConfig
    from models.registry import weights_sha256
    from privacy.secagg import SecAggConfig
    from server.config import FederationConfig
    from server.records import RunRecords
    from server.rounds import run_federation
    from simulations.config import DataConfig
    from simulations.inprocess import InProcessGrid
    from simulations.sites import SimulatedSiteLoader, held_out_test_set

    data = DataConfig(num_hospitals=3, max_train_examples=120, max_test_examples=40)
    model_config = ModelConfig(image_size=32, lora_r=4, lora_alpha=8, num_classes=2,
                               weights_sha256=weights_sha256("efficientnet-lite0-imagenet"))
    logs = {node: tmp_path / f"egress-{node}.jsonl" for node in (11, 12, 13)}
    from privacy.secagg.local_consortium import local_consortium

    grid = InProcessGrid(build_client_app(SimulatedSiteLoader(data, 0),
                                          load_identity=local_consortium([0, 1, 2])),
                         {node: {"partition-id": k, "audit-log": str(logs[node])}
                          for k, node in enumerate(logs)})
    federation = FederationConfig(rounds=1, min_hospitals=3, fraction_evaluate=0.0,
                                  secure_aggregation=SecAggConfig(enabled=True))
    run_federation(grid, federation, replace(model_config), TrainConfig(local_steps=1,
                   batch_size=16), held_out_test_set(data, 32, 0), RunRecords(tmp_path / "run"))
    for path in logs.values():
        entries = read_audit_log(path)
        stages = []
        for entry in entries:
            assert entry["message_type"] == "train.secagg" and entry["error"] is None
            keys = set(entry["configs"].get("secagg", {}))
            stages.append("setup" if "c-public" in keys else "share" if "ciphertexts" in keys
                          and "destinations" in keys else "unmask" if "seed-of" in keys
                          else "mask" if entry["tensors"] else "check" if keys == {"signature"}
                          else "?")
        assert stages == ["setup", "share", "mask", "check", "unmask"]
        assert verify_audit_log(path).ok


def test_cli_verify_names_the_broken_line(log, capsys):
    from medfed_cli import main as cli

    assert cli.main(["hospital", "audit", "verify", "--log", str(log)]) == 0
    assert "4 lines, hash chain intact" in " ".join(capsys.readouterr().out.split())
    lines = _lines(log)
    del lines[2]
    log.write_text("".join(lines))
    assert cli.main(["hospital", "audit", "verify", "--log", str(log)]) == 1
    assert "line 3 does not chain" in " ".join(capsys.readouterr().out.split())


def test_deleting_the_head_file_does_not_hide_lines_cut_off_the_end(log):
    """The attack: cut the last lines, then delete the head file that records the count."""
    from client.audit import head_path

    log.write_text("".join(_lines(log)[:3]))
    head_path(log).unlink()
    check = verify_audit_log(log)
    assert not check.ok and "head file" in check.reason and "missing" in check.reason


def test_a_message_type_no_handler_serves_is_answered_and_logged(tmp_path, site,
                                                                small_model_config):
    """The attack: send a message type the ClientApp registers no handler for (Flower's
    dispatch refuses it before any mod runs) so that its reply leaves no audit line."""
    path = tmp_path / "egress.jsonl"
    app = build_client_app(lambda context, image_size: site)
    context = Context(run_id=4, node_id=7, node_config={"partition-id": 0,
                                                        "audit-log": str(path)},
                      state=RecordDict(), run_config={})
    arrays = ArrayRecord(adapter_state(build_lora_model(small_model_config)))
    config = to_config_record(small_model_config, TrainConfig())
    config["server-round"] = 2
    for kind in ("query.exfiltrate", "train.exfiltrate", "evaluate.other"):
        reply = app(coordinator_message(kind, arrays, config), context)
        assert reply.has_error() and reply.error.reason.startswith("local-failure: ValueError")
    entries = read_audit_log(path)
    assert [e["message_type"] for e in entries] == ["query.exfiltrate", "train.exfiltrate",
                                                    "evaluate.other"]
    assert all(e["error"] and e["round"] == 2 and e["tensors"] == [] for e in entries)
    assert verify_audit_log(path).ok


def _flower_error_reply(request, reason):
    """A reply as Flower's task runtime makes it when the app raises past every guard."""
    from flwr.app import Error, Message

    return Message(Error(code=1, reason=reason), reply_to=request)


def test_a_reply_made_by_flowers_runtime_is_reduced_and_logged_before_it_leaves(
        tmp_path, small_model_config):
    """A failure outside the ClientApp (e.g. the run policy unreadable while loading the app)
    makes Flower build the reply itself, with the exception's text (which may name files):
    the push is where it is caught, reduced to a category and written to the log."""
    from client import task_guard

    path = tmp_path / "egress.jsonl"
    context = Context(run_id=4, node_id=7, node_config={"audit-log": str(path)},
                      state=RecordDict(), run_config={})
    arrays = ArrayRecord(adapter_state(build_lora_model(small_model_config)))
    config = to_config_record(small_model_config, TrainConfig())
    config["server-round"] = 5
    request = coordinator_message("train", arrays, config)
    task_guard._task["message"] = request
    pushed = []
    push = task_guard._audited_push(lambda client, message, ctx: pushed.append(message))
    push(None, _flower_error_reply(request, "<class 'OSError'>:<'/data/Jane_Doe/policy'>"),
         context)
    [sent] = pushed
    assert sent.error.reason == task_guard.RUNTIME_FAILURE_REASON
    [entry] = read_audit_log(path)
    assert entry["round"] == 5 and entry["error"]["reason"] == sent.error.reason
    assert "Jane_Doe" not in path.read_text() and verify_audit_log(path).ok
    # A reply the app already audited is pushed as it is, and not logged twice.
    app_reply = _flower_error_reply(request, "category")
    from client.audit import audit_reply

    audit_reply(request, app_reply, context)
    push(None, app_reply, context)
    assert pushed[-1] is app_reply and len(read_audit_log(path)) == 2


def test_a_reply_whose_line_cannot_be_written_is_not_pushed(tmp_path, small_model_config):
    from client import task_guard

    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the log's folder should be")
    context = Context(run_id=4, node_id=7,
                      node_config={"audit-log": str(blocked / "egress.jsonl")},
                      state=RecordDict(), run_config={})
    arrays = ArrayRecord(adapter_state(build_lora_model(small_model_config)))
    request = coordinator_message("train", arrays, to_config_record(small_model_config,
                                                                    TrainConfig()))
    task_guard._task["message"] = request
    pushed = []
    push = task_guard._audited_push(lambda client, message, ctx: pushed.append(message))
    with pytest.raises(OSError):
        push(None, _flower_error_reply(request, "boom"), context)
    assert pushed == []
