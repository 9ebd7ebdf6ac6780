"""A hostile coordinator reads a hospital's validation labels through crafted evaluate messages.

The attack: every adapter keeps LoRA at zero and sets the task head to predict class 1 exactly
when one direction ``w`` of the backbone's pooled features exceeds a threshold ``t``. As ``t``
passes example ``j``'s projection, the validation accuracy moves by ``-1/N`` if its label is 1
and ``+1/N`` if it is 0, so one evaluate message per threshold reads every label in order. The
attacker is given the ideal thresholds (midpoints of the sorted projections), stronger than a
real one. Against a hospital without caps it recovers every label of the real PneumoniaMNIST
validation examples; against the hospital's run policy (evaluations per run and per day, on a
counter in the site folder) and privacy policy (coarse metrics) it is refused past the cap,
learns at most one label per answer, and a restart of the hospital does not reset the count.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from client.app import build_client_app
from client.audit import read_audit_log
from client.evaluation_cap import DEFAULT_COUNT_FILE, admit
from client.run_policy import RunPolicy
from client.site import SiteData
from models.adapters import adapter_state
from models.config import TrainConfig, to_config_record
from models.lora import build_lora_model
from simulations.inprocess import coordinator_message

N_VAL = 40
CAP = 4
TASK = "pneumonia-cxr"
HEAD = "base_model.model.net._fc"
NODE = 2**63 + 11  # Flower's node ids are unsigned 64-bit
SCALE = 1e4  # saturates the softmax: each example's prediction is a step in t


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many small forward passes: one thread each beats two spinning on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def site(pneumonia_small):
    train, val = pneumonia_small.splits["train"], pneumonia_small.splits["val"]
    rng = np.random.default_rng(1)
    return SiteData(train=train.subset(rng.choice(len(train), 16, replace=False)),
                    val=val.subset(rng.choice(len(val), N_VAL, replace=False)))


@pytest.fixture(scope="module")
def attack(site, request):
    """The attacker's adapters, one per threshold, and the truth to score it against."""
    from models.config import ModelConfig
    from models.registry import weights_sha256

    config = ModelConfig(image_size=32, num_classes=2, lora_r=4, lora_alpha=8,
                         weights_sha256=weights_sha256("efficientnet-lite0-imagenet"))
    torch.manual_seed(0)
    model = build_lora_model(config)
    model.eval()
    pooled = []
    handle = model.get_submodule(HEAD).register_forward_hook(
        lambda module, inputs, output: pooled.append(inputs[0].detach()))
    with torch.no_grad():
        model(site.val.images)
    handle.remove()
    w = torch.randn(pooled[0].shape[1], generator=torch.Generator().manual_seed(3))
    w /= w.norm()
    projections = (pooled[0] @ w).numpy()
    order = np.argsort(projections)
    sorted_p = projections[order]
    thresholds = np.concatenate([[sorted_p[0] - 1.0], (sorted_p[1:] + sorted_p[:-1]) / 2,
                                 [sorted_p[-1] + 1.0]])
    base = adapter_state(model)
    adapters = []
    for t in thresholds:
        state = {k: v.clone() for k, v in base.items()}
        state[f"{HEAD}.weight"] = torch.stack([torch.zeros_like(w), SCALE * w])
        state[f"{HEAD}.bias"] = torch.tensor([0.0, -SCALE * float(t)])
        adapters.append(ArrayRecord(state))
    wire = to_config_record(config, TrainConfig())
    wire["server-round"], wire["min-hospitals"], wire["task"] = 1, 2, TASK
    truth = site.val.labels.numpy()[order]
    return adapters, wire, truth


def _policy_files(tmp_path, private: bool) -> dict[str, str]:
    policy = tmp_path / "run-policy.toml"
    policy.write_text(
        'allowed_backbones = ["efficientnet-lite0-imagenet"]\n'
        f'allowed_tasks = ["{TASK}"]\n'
        f"max_evaluations_per_run = {CAP if private else 10_000}\n"
        f"max_evaluations_per_day = {3 * CAP if private else 10_000}\n"
        f"min_evaluation_examples = {N_VAL}\n")
    config = {"partition-id": 0, "run-policy": str(policy),
              "audit-log": str(tmp_path / "audit.jsonl")}
    if private:
        (tmp_path / "privacy-policy.toml").write_text("max_epsilon = 8.0\ndelta = 1e-5\n")
        config |= {"privacy-policy": str(tmp_path / "privacy-policy.toml"),
                   "privacy-ledger": str(tmp_path / "ledger.sqlite")}
    return config


def _run_attack(site, attack, node_config, run_id: int, count: int | None = None):
    """Send the first ``count`` (all) crafted adapters to a fresh ClientApp (as a restarted
    daemon would be)."""
    adapters, wire, truth = attack
    adapters = adapters[:count]
    app = build_client_app(lambda context, image_size: site)
    context = Context(run_id=run_id, node_id=NODE, node_config=node_config,
                      state=RecordDict(), run_config={})
    replies = [app(coordinator_message("evaluate", arrays, wire, run_id=run_id, group_id="1"),
                   context) for arrays in adapters]
    return replies


def _recover(replies, n: int):
    """The attacker's reading: label of sorted example k from answers k and k+1, if both came
    back (``None``: not learned)."""
    accuracy = [None if r.has_error() else r.content["metrics"]["val-accuracy"] for r in replies]
    labels: list[int | None] = []
    for k in range(n):
        a, b = accuracy[k], accuracy[k + 1]
        if a is None or b is None or math.isclose(a, b):
            labels.append(None)
        else:
            labels.append(1 if b < a else 0)
    return labels


def test_without_caps_the_scan_reads_every_label(tmp_path, site, attack):
    """The control: the attack works against a hospital that answers everything exactly."""
    replies = _run_attack(site, attack, _policy_files(tmp_path, private=False), run_id=1)
    assert not any(r.has_error() for r in replies)
    learned = _recover(replies, N_VAL)
    correct = sum(g == t for g, t in zip(learned, attack[2], strict=True))
    assert correct >= 0.95 * N_VAL, (correct, learned)


def test_the_cap_refuses_the_scan_and_leaves_the_labels_unknown(tmp_path, site, attack):
    node_config = _policy_files(tmp_path, private=True)
    replies = _run_attack(site, attack, node_config, run_id=7)
    answered = [r for r in replies if not r.has_error()]
    refused = [r for r in replies if r.has_error()]
    assert len(answered) == CAP and len(refused) == len(replies) - CAP
    assert all("'max_evaluations_per_run'" in r.error.reason for r in refused)
    for reply in answered:  # coarse: two decimals, aggregates only
        metrics = dict(reply.content["metrics"])
        assert all(round(v, 2) == v for k, v in metrics.items() if k.startswith("val-")
                   and not math.isnan(v))
        assert set(metrics) <= {"num-examples", "hospital-id", "val-loss", "val-auc",
                                "val-accuracy", "val-balanced-accuracy", "val-macro-f1"}

    truth = attack[2]
    learned = _recover(replies, N_VAL)
    known = sum(g is not None for g in learned)
    correct = sum(g == t for g, t in zip(learned, truth, strict=True))
    assert known <= CAP - 1 and correct <= CAP - 1, learned
    # Guessing the rest as the majority class is all the attacker has left.
    majority = max(np.mean(truth), 1 - np.mean(truth))
    guess = [g if g is not None else int(np.mean(truth) >= 0.5) for g in learned]
    assert np.mean(np.array(guess) == truth) <= majority + CAP / N_VAL

    # Every refusal is in the egress audit log with its rule.
    entries = [e for e in read_audit_log(tmp_path / "audit.jsonl") if e["error"]]
    assert len(entries) == len(refused)
    assert all("max_evaluations_per_run" in e["error"]["reason"] for e in entries)

    # A restarted hospital (new ClientApp and context) still counts this run's evaluations.
    again = _run_attack(site, attack, node_config, run_id=7, count=CAP)
    assert all(r.has_error() for r in again)

    # New runs get their own few answers until the day's cap, then none.
    answered_later = sum(not r.has_error() for run_id in (8, 9, 10)
                         for r in _run_attack(site, attack, node_config, run_id, CAP + 1))
    assert answered_later == 2 * CAP  # 3 * CAP a day, CAP of them spent on run 7
    final = _run_attack(site, attack, node_config, run_id=11, count=CAP)
    assert all("'max_evaluations_per_day'" in r.error.reason for r in final)


def test_a_small_validation_set_is_not_evaluated_under_a_privacy_policy(tmp_path, site, attack):
    node_config = _policy_files(tmp_path, private=True)
    small = SiteData(train=site.train, val=site.val.subset(np.arange(N_VAL - 1)))
    app = build_client_app(lambda context, image_size: small)
    context = Context(run_id=3, node_id=NODE, node_config=node_config, state=RecordDict(),
                      run_config={})
    reply = app(coordinator_message("evaluate", attack[0][0], attack[1], run_id=3,
                                    group_id="1"), context)
    assert reply.has_error() and "'min_evaluation_examples'" in reply.error.reason


def test_the_counter_is_one_file_beside_the_policy_and_private(tmp_path):
    policy = RunPolicy(max_evaluations_per_run=1, max_evaluations_per_day=5)
    path = tmp_path / DEFAULT_COUNT_FILE
    assert admit(path, 1, 1, policy, now=0.0) == ""
    assert "max_evaluations_per_run" in admit(path, 1, 1, policy, now=1.0)
    assert (path.stat().st_mode & 0o777) == 0o600
    # The day's window rolls: 24 h later the same hospital may answer new runs again.
    for run in range(2, 6):
        assert admit(path, run, 1, policy, now=2.0) == ""
    assert "max_evaluations_per_day" in admit(path, 6, 1, policy, now=3.0)
    assert admit(path, 6, 1, policy, now=3.0 + 24 * 3600) == ""
