"""The hospital's run policy: which runs it takes part in at all, checked before any work.

A TOML file the hospital owns (node config ``run-policy``; ``medfed hospital init`` writes
:data:`RUN_POLICY_TEMPLATE`, which allows nothing until the hospital fills it in). Deny by
default: an empty allow-list allows nothing, and every numeric setting is an upper bound. A
message for a run the policy does not allow gets an error reply whose reason names the rule
(``run policy 'max_lora_rank': ...``), so the refusal reaches the coordinator's records
(``metrics.csv`` error column) and the hospital's egress audit log.

Two places consult it:

* the hospital's task runner (:mod:`client.warm_exec`), before anything of a run is used: the
  run's Flower App (FAB id, version, sha256) against ``allowed_apps`` / ``allowed_fab_sha256``
  (:func:`app_refusal`). Whatever the FAB holds, the hospital runs only the ClientApp of the
  medfed installed here; the allow-list decides whether it takes part at all.
* the ClientApp, for every message (``client.admission.refuse_run``): backbone, task, LoRA
  rank and targets, image size, local steps, round number, aggregate size, secure
  aggregation, and the number of evaluations (:mod:`client.evaluation_cap`).

The coordinator declares ``task`` (``federation.task`` of the study) and ``min-hospitals`` in
every message's config. Without secure aggregation a hospital cannot verify the count, so the
rule holds the coordinator to what it declared; under secure aggregation the hospital enforces
it itself: it refuses to help unmask a sum of fewer hospitals (``client.secure_aggregation``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context

from core.errors import MedfedError
from core.settings import read_settings, setting
from models.registry import HF_PREFIX, UnknownBackboneError, backbone_spec

RUN_POLICY_KEY = "run-policy"
"""Node-config key with the run policy's path."""
RUN_REFUSAL_CODE = 451
"""Flower error code of a message the hospital's run policy refused."""

STEM_MODULES = frozenset({
    "_conv_stem", "conv_stem", "stem", "conv1", "projection", "patch_embed",
    "patch_embedding", "patch_embeddings", "patch_embed_proj",
})
"""Module names (last part) of backbone layers that see the raw pixels: a LoRA adapter there
is a trained, released function of the images themselves (refused unless ``allow_stem_lora``)."""

RUN_POLICY_TEMPLATE = """\
# Which runs this hospital takes part in (medfed, client.run_policy.RunPolicy).
# Deny by default: an empty list allows nothing, so this file refuses every run until you
# fill in what your approvals cover. Numbers are upper bounds. A refused run gets an error
# reply naming the rule; see docs/hospital-security.md for every key.

# The coordinator's Flower App: "FAB_ID==VERSION" (or "FAB_ID" for any version), e.g.
# ["medfed/medfed-app==1.0.0"], and/or the sha256 of its .fab file. The hospital always runs
# its own installed medfed ClientApp, never code from the FAB.
allowed_apps = []
allowed_fab_sha256 = []

# Backbones: registry names (e.g. "efficientnet-lite0-imagenet") or "hf:<hub-id>" found in
# the local Hugging Face cache (never downloaded), and folders under which "hf:/path"
# backbones may live, e.g. ["/srv/models"].
allowed_backbones = []
backbone_roots = []
allowed_weights_sha256 = []     # empty: any (the local copy is still checked against the pin)

allowed_tasks = []              # study tasks approved here, e.g. ["pneumonia-cxr"]
min_hospitals = 3               # refuse runs that declare fewer hospitals per aggregate
require_secure_aggregation = true    # train only in securely aggregated rounds

max_lora_rank = 16
allowed_lora_targets = []       # LoRA targets beyond the backbone's defaults
allow_stem_lora = false         # true: LoRA may wrap the stem layer that sees raw pixels
max_image_size = 224            # pixels per side
max_local_steps = 500           # optimiser steps per round (runs set by steps)
max_local_epochs = 5            # passes per round (runs set by epochs)
max_batch_size = 256
max_rounds = 100                # highest round number this hospital answers in a run
max_extra_classes = 0           # study classes beyond those this hospital declared

max_evaluations_per_run = 5     # evaluate messages answered per run (counted on disk)
max_evaluations_per_day = 20    # over all runs, in any 24 hours
min_evaluation_examples = 50    # under a privacy policy: smallest validation set evaluated
evaluation_decimals = 2         # under a privacy policy: metrics are rounded to this
"""


class RunPolicyError(MedfedError, ValueError):
    """A run policy file that cannot be used."""


@dataclass(frozen=True)
class RunPolicy:
    """Attributes (deny by default: empty allow-lists allow nothing):
        allowed_apps: the coordinator's Flower App as ``"FAB_ID==VERSION"`` or ``"FAB_ID"``
            (``publisher/name``, or ``name`` alone); see :func:`app_refusal`.
        allowed_fab_sha256: sha256 (hex) of allowed ``.fab`` files. A run needs at least one of
            the two lists set, and must match every list that is set.
        allowed_backbones: registry names, or ``hf:<hub-id>`` resolved from the local
            Hugging Face cache only.
        backbone_roots: absolute folders; an ``hf:/path`` backbone is allowed when the path
            lies inside one of them (checked on the name before the disk, then on the real path).
        allowed_weights_sha256: pretrained weights hashes allowed (empty: any; the local copy
            is verified against the run's pin in any case).
        allowed_tasks: study tasks (``federation.task``); ``""`` in the list allows runs that
            declare no task.
        min_hospitals: least hospitals per aggregate the run must declare (0: no rule);
            under secure aggregation also the fewest the hospital lets be unmasked.
        require_secure_aggregation: refuse to train in rounds without secure aggregation.
        max_lora_rank: highest LoRA rank (``lora-r``).
        allowed_lora_targets: LoRA target module names allowed beyond the backbone's defaults.
        allow_stem_lora: allow targets in :data:`STEM_MODULES` (layers that see raw pixels).
        max_image_size: largest ``image-size`` (pixels per side).
        max_local_steps: most optimiser steps per round (``local-steps``).
        max_local_epochs: most epochs per round when the run trains by epochs.
        max_batch_size: largest ``batch-size``.
        max_rounds: highest ``server-round`` answered in one run.
        max_extra_classes: classes a study may have beyond those this hospital declared (its
            ``hospital.toml`` class names, or labels ``0..max`` when it names none); each is
            a head row the hospital has no example of, sent and returned as the coordinator
            chose it.
        max_evaluations_per_run: evaluate messages answered per Flower run (0: none).
        max_evaluations_per_day: evaluate messages answered over all runs in any 24 h.
        min_evaluation_examples: under a privacy policy, refuse to evaluate a validation set
            smaller than this (one example moves a metric by at most 1/N).
        evaluation_decimals: under a privacy policy, evaluation metrics are rounded to this.
    """

    allowed_apps: list[str] = field(default_factory=list)
    allowed_fab_sha256: list[str] = field(default_factory=list)
    allowed_backbones: list[str] = field(default_factory=list)
    backbone_roots: list[str] = field(default_factory=list)
    allowed_weights_sha256: list[str] = field(default_factory=list)
    allowed_tasks: list[str] = field(default_factory=list)
    min_hospitals: int = setting(0, ge=0)
    require_secure_aggregation: bool = False
    max_lora_rank: int = setting(16, ge=0)
    allowed_lora_targets: list[str] = field(default_factory=list)
    allow_stem_lora: bool = False
    max_image_size: int = setting(224, ge=0)
    max_local_steps: int = setting(500, ge=0)
    max_local_epochs: int = setting(5, ge=0)
    max_batch_size: int = setting(256, ge=0)
    max_rounds: int = setting(100, ge=0)
    max_extra_classes: int = setting(0, ge=0)
    max_evaluations_per_run: int = setting(5, ge=0)
    max_evaluations_per_day: int = setting(20, ge=0)
    min_evaluation_examples: int = setting(50, ge=0)
    evaluation_decimals: int = setting(2, ge=0)


def load_run_policy(path: Path) -> RunPolicy:
    """Read and check a run policy; errors name the file and the setting."""
    label = f"run policy {path}"
    # The one typed reader: unknown keys, wrong types and values out of range, by name.
    values = read_settings(path, RunPolicy, RunPolicyError, label)
    for name in values.get("allowed_backbones", []):
        try:
            backbone_spec(name)
        except UnknownBackboneError as err:
            raise RunPolicyError(f"{label}: 'allowed_backbones': {err}") from None
    for root in values.get("backbone_roots", []):
        if not os.path.isabs(root):
            raise RunPolicyError(f"{label}: 'backbone_roots' entry '{root}' must be an "
                                 "absolute folder")
    return RunPolicy(**values)


def _refused(rule: str, why: str) -> str:
    return f"run policy '{rule}': {why}"


def app_refusal(policy: RunPolicy, fab_id: str, fab_version: str, fab_sha256: str) -> str:
    """Why ``policy`` refuses a run of the Flower App ``fab_id`` (``publisher/name``) at
    ``fab_version`` whose FAB hashes to ``fab_sha256`` (``""``: allowed)."""
    if not policy.allowed_apps and not policy.allowed_fab_sha256:
        return _refused("allowed_apps", f"no app is allowed yet (this run's app is "
                        f"'{fab_id}=={fab_version}'); list it in allowed_apps or "
                        "allowed_fab_sha256")
    if policy.allowed_apps:
        name = fab_id.rsplit("/", 1)[-1]
        matches = False
        for entry in policy.allowed_apps:
            app, _, version = entry.partition("==")
            if app.strip() in (fab_id, name) and version.strip() in ("", fab_version):
                matches = True
        if not matches:
            return _refused("allowed_apps", f"app '{fab_id}=={fab_version}' is not allowed "
                            f"(allowed: {policy.allowed_apps})")
    if policy.allowed_fab_sha256 and fab_sha256 not in policy.allowed_fab_sha256:
        return _refused("allowed_fab_sha256", f"FAB sha256 {fab_sha256[:16]}... is not in the "
                        "allow-list")
    return ""


def _under(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or inside it (both absolute and normalised)."""
    return os.path.commonpath([path, root]) == root


def backbone_refusal(policy: RunPolicy, backbone: str) -> str:
    """Why ``policy`` refuses ``backbone`` (``""``: allowed). An ``hf:/path`` outside every
    ``backbone_roots`` is refused on its name alone, before any file is looked at."""
    if backbone in policy.allowed_backbones:
        return ""
    ref = backbone[len(HF_PREFIX):] if backbone.startswith(HF_PREFIX) else ""
    if ref and os.path.isabs(ref) and policy.backbone_roots:
        named = os.path.normpath(ref)
        roots = [os.path.normpath(r) for r in policy.backbone_roots]
        if any(_under(named, root) for root in roots):
            # The name is inside a root; a symlink there must not lead out of them.
            real = os.path.realpath(named)
            if any(_under(real, os.path.realpath(root)) for root in roots):
                return ""
            return _refused("backbone_roots", f"backbone '{backbone}' leads outside the "
                            "allowed folders")
        return _refused("backbone_roots", f"backbone '{backbone}' is not inside an allowed "
                        f"folder (allowed: {policy.backbone_roots})")
    if ref and not os.path.isabs(ref):
        return _refused("allowed_backbones", f"backbone '{backbone}' is a hub id or relative "
                        "path the hospital has not listed (nothing is downloaded)")
    return _refused("allowed_backbones", f"backbone '{backbone}' is not allowed (allowed: "
                    f"{policy.allowed_backbones}, folders: {policy.backbone_roots})")


def _targets_refusal(policy: RunPolicy, config: Any, backbone: str) -> str:
    targets = [str(t) for t in (config.get("lora-targets") or [])]
    stem = sorted(t for t in targets if t.rsplit(".", 1)[-1] in STEM_MODULES)
    if stem and not policy.allow_stem_lora:
        return _refused("allow_stem_lora", f"LoRA targets {stem} include the stem layer that "
                        "sees raw pixels")
    try:
        defaults = set(backbone_spec(backbone).default_targets)
    except UnknownBackboneError:
        defaults = set()
    extra = sorted(set(targets) - defaults - set(policy.allowed_lora_targets) - set(stem))
    if extra:
        return _refused("allowed_lora_targets", f"LoRA targets {extra} are not the backbone's "
                        f"defaults nor allowed (allowed: {policy.allowed_lora_targets})")
    return ""


class _NotWholeNumber(ValueError):
    """A bounded setting the coordinator sent as something other than an ``int``."""


def _number(config: Any, key: str) -> int:
    """``config[key]`` (0 when absent) as an ``int``; a string, float or bool raises: a bound
    must never read a value it cannot compare as 0 (``"1000000"`` past ``max_rounds``)."""
    value = config.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _NotWholeNumber(f"'{key}' = {str(value)[:40]!r} is not a whole number")
    return value


def _bounds_refusal(policy: RunPolicy, config: Any) -> str:
    try:
        return _bounds_checked(policy, config)
    except _NotWholeNumber as err:
        return _refused("bounds", f"{err}; every bounded setting must be a whole number")


def _bounds_checked(policy: RunPolicy, config: Any) -> str:
    steps = _number(config, "local-steps")
    checks = [("max_lora_rank", "lora-r", "LoRA rank"),
              ("max_image_size", "image-size", "image size"),
              ("max_local_steps", "local-steps", "local steps per round"),
              ("max_batch_size", "batch-size", "batch size"),
              ("max_rounds", "server-round", "round number")]
    if steps == 0:  # trained by epochs
        checks.append(("max_local_epochs", "local-epochs", "local epochs per round"))
    for rule, key, what in checks:
        value, bound = _number(config, key), getattr(policy, rule)
        if value > bound:
            return _refused(rule, f"{what} {value} is above this hospital's bound {bound}")
    ranks = config.get("hetlora-ranks") or []
    if any(isinstance(r, bool) or not isinstance(r, int) for r in ranks):
        raise _NotWholeNumber(f"'hetlora-ranks' = {str(list(ranks))[:40]} holds a value that "
                              "is not a whole number")
    if any(r > policy.max_lora_rank for r in ranks):
        return _refused("max_lora_rank", f"hetlora ranks {list(ranks)} exceed this hospital's "
                        f"bound {policy.max_lora_rank}")
    return ""


def run_refusal(policy: RunPolicy, config, message_type: str = "") -> str:
    """Why ``policy`` refuses a run with this round config (``""``: allowed); a plain
    ``train`` message is refused when the policy requires secure aggregation."""
    if policy.require_secure_aggregation and message_type == "train":
        return _refused("require_secure_aggregation", "this hospital trains only under "
                        "secure aggregation (the run sends plain training rounds)")
    backbone = str(config.get("backbone", ""))
    if reason := backbone_refusal(policy, backbone):
        return reason
    weights = str(config.get("weights-sha256", ""))
    if policy.allowed_weights_sha256 and weights not in policy.allowed_weights_sha256:
        return _refused("allowed_weights_sha256", f"base model weights "
                        f"{weights[:16] or '(not pinned)'}... are not in the allow-list")
    task = str(config.get("task", ""))
    if task not in policy.allowed_tasks:
        return _refused("allowed_tasks", f"task '{task or '(undeclared)'}' is not allowed "
                        f"(allowed: {policy.allowed_tasks}; the study declares it as "
                        "federation.task)")
    try:
        declared = _number(config, "min-hospitals")
    except _NotWholeNumber as err:
        return _refused("min_hospitals", str(err))
    if declared < policy.min_hospitals:
        return _refused("min_hospitals", f"the run declares at least {declared} hospitals per "
                        f"aggregate, the hospital requires {policy.min_hospitals}")
    return _targets_refusal(policy, config, backbone) or _bounds_refusal(policy, config)


def policy_min_hospitals(context: Context) -> int:
    """The node's run-policy ``min_hospitals`` (0 without a policy)."""
    path = context.node_config.get(RUN_POLICY_KEY)
    return load_run_policy(Path(str(path))).min_hospitals if path else 0


def node_run_policy(context: Context) -> RunPolicy | None:
    """The node config's run policy (``None``: the node has none, as in simulation)."""
    path = context.node_config.get(RUN_POLICY_KEY)
    return load_run_policy(Path(str(path))) if path else None
