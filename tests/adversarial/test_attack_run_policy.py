"""A hostile coordinator asks a hospital for runs its run policy does not cover.

Each attack goes through the real ClientApp with a real run policy file, egress audit log and
site data: a backbone path outside the hospital's model folder (``hf:/etc``, a ``..`` escape,
a symlink out), a hub id (which would start a download), LoRA rank 512, a LoRA adapter on the
stem convolution that sees raw pixels, 4096-pixel images, a million local steps, round 10^6.
Each is refused before any work, with a reason naming the rule, audited, and while it is
handled no file outside the allowed roots is opened or listed and no socket is touched
(Python audit hooks watch every ``open``, directory listing and socket call).
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from client.app import build_client_app
from client.audit import read_audit_log
from client.run_policy import RUN_POLICY_TEMPLATE, RunPolicyError, load_run_policy
from client.site import SiteData
from client.site_folder import init_site_folder
from models.adapters import adapter_state
from models.config import TrainConfig, to_config_record
from models.lora import build_lora_model
from models.registry import weights_sha256
from simulations.inprocess import coordinator_message

TASK = "pneumonia-cxr"
_watch: dict[str, list] = {"events": [], "on": []}


def _hook(event: str, args: tuple) -> None:
    if _watch["on"] and (event in ("open", "os.listdir", "os.scandir")
                         or event.startswith("socket.")):
        _watch["events"].append((event, args[0] if args else None))


sys.addaudithook(_hook)  # hooks cannot be removed: it records only while a test turns it on


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small forward passes: one thread beats two spinning on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def arrays(request):
    from models.config import ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(image_size=32, num_classes=2, lora_r=4, lora_alpha=8)
    return ArrayRecord(adapter_state(build_lora_model(config, verify=False)))


@pytest.fixture
def hospital(tmp_path, pneumonia_small):
    models = tmp_path / "models"
    (models / "vit").mkdir(parents=True)
    (models / "escape").symlink_to("/etc")
    policy = tmp_path / "run-policy.toml"
    policy.write_text(
        'allowed_apps = ["medfed/medfed-app==1.0.0"]\n'
        'allowed_backbones = ["efficientnet-lite0-imagenet"]\n'
        f'backbone_roots = ["{models}"]\n'
        f'allowed_tasks = ["{TASK}"]\nmin_hospitals = 2\n')
    train = pneumonia_small.splits["train"]
    rng = np.random.default_rng(0)
    site = SiteData(train=train.subset(rng.choice(len(train), 32, replace=False)),
                    val=train.subset(rng.choice(len(train), 16, replace=False)))
    loads = []
    app = build_client_app(lambda context, image_size: loads.append(image_size) or site)
    context = Context(run_id=9, node_id=3, state=RecordDict(), run_config={}, node_config={
        "partition-id": 0, "run-policy": str(policy), "audit-log": str(tmp_path / "audit.jsonl")})
    return app, context, loads, tmp_path


def _config(model_config, **changes):
    config = to_config_record(replace(model_config, **{k: v for k, v in changes.items()
                                                      if k in model_config.__dict__}),
                              replace(TrainConfig(local_steps=2, batch_size=8),
                                      **{k: v for k, v in changes.items()
                                         if k in TrainConfig.__dataclass_fields__}))
    config["server-round"] = changes.get("server_round", 1)
    config["min-hospitals"] = 2
    config["task"] = TASK
    return config


ATTACKS = [
    ({"backbone": "hf:/etc"}, "backbone_roots"),
    ({"backbone": "hf:/etc/passwd"}, "backbone_roots"),
    ({"backbone": "hf:{root}/models/../../../etc"}, "backbone_roots"),
    ({"backbone": "hf:{root}/models/escape"}, "backbone_roots"),
    ({"backbone": "hf:google/vit-base-patch16-224"}, "allowed_backbones"),
    ({"backbone": "hf:models/vit"}, "allowed_backbones"),
    ({"lora_r": 512, "lora_alpha": 1024}, "max_lora_rank"),
    ({"lora_targets": ["_conv_stem"]}, "allow_stem_lora"),
    ({"lora_targets": ["_expand_conv", "_depthwise_conv"]}, "allowed_lora_targets"),
    ({"image_size": 4096}, "max_image_size"),
    ({"local_steps": 1_000_000}, "max_local_steps"),
    ({"local_steps": 0, "local_epochs": 1000}, "max_local_epochs"),
    ({"server_round": 1_000_000}, "max_rounds"),
]


@pytest.mark.parametrize("changes, rule", ATTACKS)
@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_out_of_policy_runs_are_refused_without_touching_disk_or_network(
        hospital, arrays, small_model_config, changes, rule, kind):
    app, context, loads, root = hospital
    changes = {k: v.format(root=root) if isinstance(v, str) else v for k, v in changes.items()}
    message = coordinator_message(kind, arrays, _config(small_model_config, **changes),
                                  run_id=9, group_id="1")
    _watch["events"].clear()
    _watch["on"].append(1)
    try:
        reply = app(message, context)
    finally:
        _watch["on"].clear()
    assert reply.has_error() and f"run policy '{rule}'" in reply.error.reason, reply.error
    assert loads == []  # the site's data was never loaded, no model built
    allowed = (str(root / "run-policy.toml"), str(root / "audit.jsonl"))
    touched = [(event, str(arg)) for event, arg in _watch["events"]]
    assert [t for t in touched if t[0].startswith("socket.")] == []
    assert ("open", allowed[0]) in touched  # the hooks saw the policy being read

    def audit_file(name: str) -> bool:
        # The audit log, its hash-chain head (written atomically through a temporary file)
        # and file descriptors already opened on them by os.open.
        return name.startswith(allowed[1]) or name.isdigit()

    assert [t for t in touched if t[1] not in allowed and not audit_file(t[1])] == [], touched
    (entry,) = read_audit_log(root / "audit.jsonl")
    assert rule in entry["error"]["reason"] and entry["tensors"] == []


def test_a_refusal_does_not_say_whether_a_path_exists(hospital, small_model_config):
    app, context, _, _ = hospital
    reasons = []
    for path in ("/etc", "/no-such-folder-anywhere"):
        message = coordinator_message("evaluate", ArrayRecord(),
                                      _config(small_model_config, backbone=f"hf:{path}"),
                                      run_id=9, group_id="1")
        reasons.append(app(message, context).error.reason.replace(path, "PATH"))
    assert reasons[0] == reasons[1]


def test_without_a_run_policy_the_same_backbone_name_lists_etc(hospital, arrays,
                                                               small_model_config):
    """The control: what the policy prevents (the hooks would have seen it)."""
    app, context, _, _ = hospital
    del context.node_config["run-policy"]
    message = coordinator_message("evaluate", arrays,
                                  _config(small_model_config, backbone="hf:/etc"), run_id=9,
                                  group_id="1")
    _watch["events"].clear()
    _watch["on"].append(1)
    try:
        app(message, context)
    finally:
        _watch["on"].clear()
    assert ("os.scandir", "/etc") in _watch["events"] or \
        ("os.listdir", "/etc") in _watch["events"], _watch["events"][:20]


def test_the_same_run_inside_the_policy_is_answered(hospital, arrays, small_model_config):
    app, context, loads, _ = hospital
    reply = app(coordinator_message("train", arrays, _config(small_model_config), run_id=9,
                                    group_id="1"), context)
    assert not reply.has_error(), reply.error
    assert loads == [small_model_config.image_size]


def test_the_template_refuses_every_run_until_the_hospital_fills_it(tmp_path, small_model_config):
    init_site_folder(tmp_path / "site", "general")
    policy = tmp_path / "site" / "run-policy.toml"
    assert policy.read_text() == RUN_POLICY_TEMPLATE
    template = load_run_policy(policy)
    assert template.allowed_apps == template.allowed_backbones == template.allowed_tasks == []
    from client.run_policy import app_refusal, run_refusal

    assert "'allowed_apps'" in app_refusal(template, "medfed/medfed-app", "1.0.0", "0" * 64)
    config = _config(small_model_config)
    assert "'allowed_backbones'" in run_refusal(template, config, "evaluate")
    # Filled in for this run, the template's bounds and secure aggregation rule still hold.
    filled = replace(template, allowed_backbones=["efficientnet-lite0-imagenet"],
                     allowed_tasks=[TASK], min_hospitals=2)
    assert run_refusal(filled, config, "evaluate") == ""
    assert "'require_secure_aggregation'" in run_refusal(filled, config, "train")


@pytest.mark.parametrize("text, key", [
    ('allowed_backbones = ["resnet-9000"]\n', "allowed_backbones"),
    ('backbone_roots = ["models"]\n', "backbone_roots"),
    ("max_lora_rank = -1\n", "max_lora_rank"),
    ('max_image_size = "big"\n', "max_image_size"),
    ("allow_stem_lora = 1\n", "allow_stem_lora"),
])
def test_a_bad_policy_file_names_the_setting(tmp_path, text, key):
    path = tmp_path / "run-policy.toml"
    path.write_text(text)
    with pytest.raises(RunPolicyError, match=key):
        load_run_policy(path)


def test_the_registry_never_downloads_a_hub_id():
    _watch["events"].clear()
    _watch["on"].append(1)
    try:
        with pytest.raises(FileNotFoundError, match="never downloads"):
            weights_sha256("hf:an-org/a-model-nobody-has-cached")
    finally:
        _watch["on"].clear()
    assert [e for e in _watch["events"] if e[0].startswith("socket.")] == []
