"""A dry run of a study against the hospital's own policies and data, before round 1.

The coordinator sends a ``query`` message holding the study's round config (the config every
training message of the run will carry) and what the whole study asks: ``study-rounds``,
``rounds-left`` (rounds still to run, after a resume), ``secure-aggregation`` and
``evaluations`` (evaluate messages the run will send this hospital). The hospital answers, for
each item, ``pass`` or ``fail: <reason naming the setting>``, exactly as the run's messages
would be refused later: nothing is trained, evaluated, charged or counted.

Items: ``data`` (the site's data can be read), ``run-policy`` (backbone, task, LoRA, bounds,
rounds), ``secure-aggregation``, ``classes``, ``evaluation`` (validation size against
``min_evaluation_examples``, evaluations against ``max_evaluations_per_run``), ``dataset-id``,
``differential-privacy`` (``require_dp``, delta) and ``budget`` (the study's remaining rounds
against the budget left on the dataset). The reply carries pass/fail and reasons only: no count
of images or epsilon spent beyond what evaluation already releases. ``medfed hospital check
--study FILE`` runs the same function at the hospital.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.classes import ClassMismatch, for_study
from client.privacy_round import (
    PrivacyRefusal,
    SitePrivacy,
    SitePrivacyLoader,
    check_delta,
    plan_charges,
)
from client.run_policy import RunPolicy, node_run_policy, run_refusal
from client.segmentation import is_segmentation
from client.segmentation_site import SegmentationCounts, segmentation_counts
from client.site import SiteData, SiteLoader
from models.config import ModelConfig, TrainConfig, from_config_record
from privacy.config import dp_config_from_record

CHECK_RECORD = "study-check"
"""The reply's ConfigRecord: item name -> ``pass`` or ``fail: reason``."""
PASS = "pass"


@dataclass(frozen=True)
class CheckItem:
    """One item of the dry run: its name, whether the study passes it, and why not."""

    name: str
    passed: bool
    reason: str = ""

    @property
    def answer(self) -> str:
        """What the reply carries for the item."""
        return PASS if self.passed else f"fail: {self.reason}"


def _item(name: str, reason: str) -> CheckItem:
    return CheckItem(name, not reason, reason)


def _rounds_left(config: Any) -> int:
    return int(config.get("rounds-left", config.get("study-rounds", 1)))


def policy_items(policy: RunPolicy | None, config: Any) -> list[CheckItem]:
    """The run policy against the whole study: its settings, its highest round number, and
    secure aggregation when the policy requires it."""
    if policy is None:
        return [_item("run-policy", ""), _item("secure-aggregation", "")]
    whole = dict(config) | {"server-round": int(config.get("study-rounds", 1))}
    secagg = ""
    if policy.require_secure_aggregation and not config.get("secure-aggregation", False):
        secagg = ("run policy 'require_secure_aggregation': this hospital trains only under "
                  "secure aggregation, and the study has it off ([federation."
                  "secure_aggregation] enabled = true)")
    return [_item("run-policy", run_refusal(policy, whole, "")),
            _item("secure-aggregation", secagg)]


def evaluation_item(policy: RunPolicy | None, privacy: SitePrivacy,
                    site: SiteData | SegmentationCounts, config: Any) -> CheckItem:
    """Whether the hospital will answer the run's evaluations (a refusal voids no training,
    but leaves the hospital out of the judged results)."""
    evaluations = int(config.get("evaluations", 0))
    if policy is None or not evaluations:
        return _item("evaluation", "")
    if privacy.policy is not None and len(site.val) < policy.min_evaluation_examples:
        return _item("evaluation", f"run policy 'min_evaluation_examples': the validation split "
                     f"holds fewer than {policy.min_evaluation_examples} examples, so this "
                     "hospital evaluates no round (lower the setting, or give the hospital a "
                     "larger validation split)")
    if evaluations > policy.max_evaluations_per_run:
        return _item("evaluation", f"run policy 'max_evaluations_per_run': the study evaluates "
                     f"{evaluations} rounds, this hospital answers "
                     f"{policy.max_evaluations_per_run}")
    return _item("evaluation", "")


def privacy_items(privacy: SitePrivacy, site: SiteData | SegmentationCounts,
                  config: Any) -> list[CheckItem]:
    """The site's privacy policy against the study: dataset id, DP required, delta, and the
    budget left on the dataset for every remaining round."""
    policy = privacy.policy
    if policy is None:
        return [_item(name, "") for name in ("dataset-id", "differential-privacy", "budget")]
    dp = dp_config_from_record(config)
    charges = plan_charges(dp, len(site.train), from_config_record(TrainConfig, config))
    dataset = ("" if privacy.dataset_id or not charges else
               "this hospital declared no dataset id, so it cannot keep a privacy budget: set "
               "dataset_id in hospital.toml (node config 'dataset-id')")
    private = ""
    if not charges and policy.require_dp:
        private = ("privacy policy 'require_dp': the study trains without differential "
                   "privacy ([privacy] dpsgd or update DP)")
    elif charges:
        try:
            check_delta(dp, policy, len(site.train))
        except PrivacyRefusal as refusal:
            private = f"privacy policy 'delta': {refusal}"
    budget = ""
    if charges and privacy.dataset_id and privacy.ledger is not None:
        rounds = _rounds_left(config)
        total = privacy.ledger.projected_epsilon(privacy.dataset_id, charges * rounds,
                                                 policy.delta, policy.accountant)
        if total > policy.max_epsilon:
            budget = (f"privacy policy 'max_epsilon': the study's {rounds} rounds would take "
                      f"epsilon on dataset '{privacy.dataset_id}' past the site budget "
                      f"{policy.max_epsilon:g} (delta {policy.delta:g})")
    return [_item("dataset-id", dataset), _item("differential-privacy", private),
            _item("budget", budget)]


def study_checks(config: Any, context: Context, load_site: SiteLoader,
                 load_privacy: SitePrivacyLoader) -> list[CheckItem]:
    """Every item of the dry run of the study ``config`` at this hospital (see the module
    docstring); nothing is trained, charged or counted."""
    policy = node_run_policy(context)
    items = policy_items(policy, config)
    model_config = from_config_record(ModelConfig, config)
    if is_segmentation(config):  # its own manifest and classes; nothing is embedded
        return items + segmentation_items(policy, config, context, load_privacy)
    try:
        site = load_site(context, model_config.image_size)
    except (OSError, ValueError, KeyError) as err:  # the category only: no path or id leaves
        return items + [_item("data", f"the site's data cannot be read "
                                      f"({type(err).__name__}); run 'medfed hospital check' "
                                      "at the hospital")]
    items.append(_item("data", ""))
    try:
        site = for_study(site, list(config.get("classes", [])), model_config.num_classes)
        items.append(_item("classes", ""))
    except ClassMismatch as mismatch:
        items.append(_item("classes", str(mismatch)))
    privacy = load_privacy(context)
    return items + [evaluation_item(policy, privacy, site, config)] + privacy_items(
        privacy, site, config)


def segmentation_items(policy: RunPolicy | None, config: Any, context: Context,
                       load_privacy: SitePrivacyLoader) -> list[CheckItem]:
    """The data, classes, evaluation and privacy items of a segmentation study (privacy
    counted in patients, evaluation in validation cases)."""
    try:
        site = segmentation_counts(context, list(config.get("classes", [])))
    except ClassMismatch as mismatch:
        return [_item("data", ""), _item("classes", str(mismatch))]
    except (OSError, ValueError, KeyError) as err:  # the category only: no path or id leaves
        return [_item("data", f"the site's data cannot be read ({type(err).__name__}); run "
                              "'medfed hospital check' at the hospital")]
    privacy = load_privacy(context)
    dp = dp_config_from_record(config)
    dpsgd = ("DP-SGD is not available for segmentation (it would protect a slice, not a "
             "patient): use client-level DP ([privacy] update_dp)" if dp.dpsgd else "")
    return [_item("data", ""), _item("classes", ""), _item("dp-sgd", dpsgd),
            evaluation_item(policy, privacy, site, config)] + privacy_items(privacy, site, config)


def handle_study_check(msg: Message, context: Context, load_site: SiteLoader,
                       load_privacy: SitePrivacyLoader, hospital: int) -> Message:
    """The ClientApp's ``query`` handler: the dry run's items, pass/fail and reasons only, and
    the hospital's id (``hospital``) as in every reply."""
    items = study_checks(msg.content["config"], context, load_site, load_privacy)
    content = RecordDict({
        CHECK_RECORD: ConfigRecord({item.name: item.answer for item in items}),
        "metrics": MetricRecord({"hospital-id": hospital}),
    })
    return Message(content=content, reply_to=msg)
