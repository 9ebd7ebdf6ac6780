"""The hospital's run policy: which runs it takes part in at all, checked before any work.

A TOML file the hospital owns (node config ``run-policy``; ``medfed hospital init`` writes a
template). A message for a run the policy does not allow gets an error reply whose reason names
the rule, so the refusal reaches the coordinator's records (``metrics.csv`` error column)::

    allowed_backbones = ["efficientnet-lite0-imagenet"]    # empty: any backbone
    allowed_weights_sha256 = ["579344...77db"]             # empty: any pinned weights
    allowed_tasks = ["pneumonia-cxr"]   # empty: any task, declared or not
    min_hospitals = 3      # refuse runs whose coordinator declares fewer (0: no rule)
    require_secure_aggregation = true   # train only in securely aggregated rounds

The coordinator declares ``task`` (``federation.task`` of the study) and ``min-hospitals`` in
every message's config. Without secure aggregation a
hospital cannot verify the count, so the rule holds the coordinator to what it declared; under
secure aggregation the hospital enforces it itself: it refuses to help unmask a sum of fewer
hospitals (``client.secure_aggregation``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context, Error, Message

from models.settings import read_settings

RUN_POLICY_KEY = "run-policy"
"""Node-config key with the run policy's path."""
RUN_REFUSAL_CODE = 451
"""Flower error code of a message the hospital's run policy refused."""

RUN_POLICY_TEMPLATE = """\
# Which runs this hospital takes part in (medfed, client.run_policy.RunPolicy). Empty lists allow
# any value. A refused run gets an error reply naming the rule.

allowed_backbones = []          # e.g. ["efficientnet-lite0-imagenet"]
allowed_weights_sha256 = []     # sha256 of the pretrained weights the run may use
allowed_tasks = []              # study tasks approved here, e.g. ["pneumonia-cxr"]
min_hospitals = 0               # refuse runs that declare fewer hospitals per aggregate
require_secure_aggregation = false   # true: train only in securely aggregated rounds
"""


class RunPolicyError(ValueError):
    """A run policy file that cannot be used."""


@dataclass(frozen=True)
class RunPolicy:
    """Attributes:
        allowed_backbones: backbone names allowed (empty: any).
        allowed_weights_sha256: pretrained weights hashes allowed (empty: any).
        allowed_tasks: study tasks allowed (the study's ``federation.task``; empty: any); a run
            that declares no task is refused when the list is not empty.
        min_hospitals: least hospitals per aggregate the run must declare (0: no rule);
            under secure aggregation also the fewest the hospital lets be unmasked.
        require_secure_aggregation: refuse to train in rounds without secure aggregation.
    """

    allowed_backbones: list[str] = field(default_factory=list)
    allowed_weights_sha256: list[str] = field(default_factory=list)
    allowed_tasks: list[str] = field(default_factory=list)
    min_hospitals: int = 0
    require_secure_aggregation: bool = False


def load_run_policy(path: Path) -> RunPolicy:
    """Read and check a run policy; errors name the file and the setting."""
    values = read_settings(path, RunPolicy, RunPolicyError, f"run policy {path}")
    for name in ("allowed_backbones", "allowed_weights_sha256", "allowed_tasks"):
        if not all(isinstance(v, str) for v in values.get(name, [])):
            raise RunPolicyError(f"run policy {path}: '{name}' must be a list of strings")
    if not isinstance(values.get("min_hospitals", 0), int):
        raise RunPolicyError(f"run policy {path}: 'min_hospitals' must be an integer")
    if not isinstance(values.get("require_secure_aggregation", False), bool):
        raise RunPolicyError(f"run policy {path}: 'require_secure_aggregation' must be true or "
                             "false")
    return RunPolicy(**values)


def run_refusal(policy: RunPolicy, config, message_type: str = "") -> str:
    """Why ``policy`` refuses a run with this round config (``""``: allowed); a plain
    ``train`` message is refused when the policy requires secure aggregation."""
    if policy.require_secure_aggregation and message_type == "train":
        return ("run policy: this hospital trains only under secure aggregation (the run "
                "sends plain training rounds)")
    backbone = str(config.get("backbone", ""))
    weights = str(config.get("weights-sha256", ""))
    if policy.allowed_backbones and backbone not in policy.allowed_backbones:
        return (f"run policy: backbone '{backbone}' is not allowed (allowed: "
                f"{policy.allowed_backbones})")
    if policy.allowed_weights_sha256 and weights not in policy.allowed_weights_sha256:
        return (f"run policy: base model weights {weights[:16] or '(not pinned)'}... are not in "
                f"the allow-list")
    task = str(config.get("task", ""))
    if policy.allowed_tasks and task not in policy.allowed_tasks:
        return (f"run policy: task '{task or '(undeclared)'}' is not allowed (allowed: "
                f"{policy.allowed_tasks}; the study declares it as federation.task)")
    declared = int(config.get("min-hospitals", 0))
    if declared < policy.min_hospitals:
        return (f"run policy: the run declares at least {declared} hospitals per aggregate, the "
                f"hospital requires {policy.min_hospitals}")
    return ""


def policy_min_hospitals(context: Context) -> int:
    """The node's run-policy ``min_hospitals`` (0 without a policy)."""
    path = context.node_config.get(RUN_POLICY_KEY)
    return load_run_policy(Path(str(path))).min_hospitals if path else 0


def refuse_run(msg: Message, context: Context) -> Message | None:
    """An error reply if the node config's run policy refuses ``msg``'s run, else None."""
    path = context.node_config.get(RUN_POLICY_KEY)
    if not path or not msg.has_content() or "config" not in msg.content.config_records:
        return None
    reason = run_refusal(load_run_policy(Path(str(path))), msg.content.config_records["config"],
                         msg.metadata.message_type)
    if not reason:
        return None
    return Message(Error(code=RUN_REFUSAL_CODE, reason=reason), reply_to=msg)
