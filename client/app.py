"""The hospital's Flower ClientApp: records in, records out; the work lives in plain functions.

train: load the global adapter, train on the site's training split, send back the new adapter
(and nothing else but the example count and the training loss). evaluate: the global adapter on
the site's validation split, metrics only.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from flwr.app import (
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from client.admission import refuse_run
from client.audit import AuditedClientApp, audited_mod
from client.classes import check_class_count, for_study
from client.evaluation_cap import EvaluationRefusal, released_metrics
from client.exchange import hospital_model_config, receive_adapter, send_adapter
from client.model_cache import lora_model_for
from client.privacy_round import (  # DP-SGD, update DP, site policy and ledger
    REFUSAL_CODE,
    RUN_KEY,
    PrivacyRefusal,
    SitePrivacyLoader,
    is_private,
    ledger_dataset_id,
    site_privacy_from_node_config,
    train_round,
)
from client.released_rounds import keep_release, replayed_release
from client.round_config import (
    ROUND_CONFIG_CODE,
    RoundReplay,
    check_fresh_round,
    record_answered_round,
    typed_config_mod,
)
from client.run_policy import RUN_REFUSAL_CODE, node_run_policy
from client.secure_aggregation import handle_secagg
from client.segmentation import (
    is_segmentation,
    prepare_segmentation,
    segmentation_scores,
    segmentation_trainer,
    validation_count,
)
from client.site import SiteLoader, load_site_from_node_config
from client.study_check import handle_study_check
from client.wire import packed_wire_mod
from models.config import ModelConfig, TrainConfig, from_config_record, round_lr
from models.metrics import evaluate
from privacy.config import DPConfig, dp_config_from_record
from privacy.secagg.config import ACTION as SECAGG_ACTION
from privacy.secagg.identity import IdentityLoader, identity_from_node_config

logger = logging.getLogger(__name__)


def hospital_id(context: Context) -> int:
    """Numeric id for metrics: the simulation's partition id, else the Flower node id."""
    return int(context.node_config.get("partition-id", context.node_id))


def _prepare(msg: Message, context: Context, load_site: SiteLoader):
    # The config record is already typed and bounded (client.round_config.typed_config_mod).
    config = msg.content["config"]
    # A hetlora hospital builds its model at its own LoRA rank.
    model_config = hospital_model_config(from_config_record(ModelConfig, config), config, context)
    # The class count before any head is allocated: at most the hospital's own classes plus
    # what its run policy allows; then its labels in the study's order, or a refusal.
    site = load_site(context, model_config.image_size)
    run_policy = node_run_policy(context)
    if run_policy is not None:
        check_class_count(site, model_config.num_classes, run_policy.max_extra_classes)
    site = for_study(site, list(config.get("classes", [])), model_config.num_classes)
    model = lora_model_for(model_config)
    # The round's adapter-exchange mode (FFA-LoRA freezes A, FedSA-LoRA adds own B); the
    # adapter is finite or refused.
    receive_adapter(model, msg.content["arrays"], config, context)
    return model, config, site


def _round_dp(msg: Message) -> DPConfig:
    """The round's DP settings; ``update_min_sum_size`` only counts in a securely aggregated
    round, where the hospital's own secure-aggregation handler set it."""
    dp = dp_config_from_record(msg.content["config"])
    if msg.metadata.message_type != f"train.{SECAGG_ACTION}" and dp.update_min_sum_size:
        dp = replace(dp, update_min_sum_size=0)
    return dp


def _prepare_training(msg: Message, context: Context, load_site: SiteLoader, dp: DPConfig):
    """The model, typed config and site of a training round, and for a segmentation round its
    own local training and privacy-unit count (the patients); ``None`` for classification."""
    config = msg.content["config"]
    if is_segmentation(config):
        model, site = prepare_segmentation(config, msg.content["arrays"], context)
        return (model, config, site, segmentation_trainer(site, config, dp),
                site.train_patients)
    model, config, site = _prepare(msg, context, load_site)
    return model, config, site, None, None


def handle_train(
    msg: Message,
    context: Context,
    load_site: SiteLoader,
    load_privacy: SitePrivacyLoader = site_privacy_from_node_config,
) -> Message:
    """Local training on the global adapter; the reply carries the new adapter and counts.

    Without DP the metrics are the example count and the training loss. A private round (DP
    on, or a site privacy policy) withholds the loss and adds ``dp-epsilon`` and ``dp-delta``;
    a round the site's privacy policy refuses gets an error reply whose reason says why
    (nothing is released). A round at or below one this run already answered is refused
    (``round-replay``); a private round the ledger has already charged for this run (a
    resumed coordinator's replay, in a new Flower run) gets the reply already released, or a
    refusal; an adapter or update that is not finite is refused (``non-finite``, by the
    egress point), before the ledger is charged.
    """
    server_round = int(msg.content["config"]["server-round"])
    try:  # a round this run already answered (or an earlier one) is never trained again
        check_fresh_round(context, server_round)
    except RoundReplay as replay:
        return Message(Error(code=ROUND_CONFIG_CODE, reason=str(replay)), reply_to=msg)
    dp, privacy = _round_dp(msg), load_privacy(context)
    try:
        model, config, site, local_train, units = _prepare_training(msg, context, load_site, dp)
    except PrivacyRefusal as refusal:
        return Message(Error(code=REFUSAL_CODE, reason=str(refusal)), reply_to=msg)
    train_config = from_config_record(TrainConfig, config)
    hospital = hospital_id(context)
    # Batch order and dropout: distinct per hospital and round, same on replay. DP noise never
    # comes from it (a CSPRNG at the hospital, see privacy.noise).
    seed = train_config.seed * 1_000_003 + server_round * 1_009 + hospital
    fingerprint, received = str(site.info.get("fingerprint", "")), msg.content["arrays"]
    run = str(config.get(RUN_KEY, "")) or str(context.run_id)
    dataset_id = ledger_dataset_id(privacy, fingerprint, site.train) if privacy.ledger else ""
    # Plain train_local unless the run asks for DP or the site has a privacy policy.
    try:
        # A round already charged and released (a resumed coordinator sends it again) goes
        # out again as it was: never trained twice (client.released_rounds).
        kept = replayed_release(privacy, dataset_id, run, server_round, received)
        if kept is not None:
            return Message(content=kept, reply_to=msg)
        loss, dp_metrics = train_round(
            model, site.train, train_config, dp, privacy,
            context, server_round, seed, lr=round_lr(train_config, server_round),
            data_fingerprint=fingerprint, run_key=run, local_train=local_train,
            privacy_units=units,
        )
    except PrivacyRefusal as refusal:
        return Message(Error(code=REFUSAL_CODE, reason=str(refusal)), reply_to=msg)
    # The raw training loss is not covered by the ledger: a private round withholds it.
    loss_metric = {} if is_private(dp, privacy) else {"train-loss": loss}
    metrics = MetricRecord(
        {"num-examples": len(site.train), "hospital-id": hospital} | loss_metric | dp_metrics
    )
    arrays = send_adapter(model, config, context)  # only the exchanged tensors
    content = RecordDict({"arrays": arrays, "metrics": metrics})
    # The site's dataset fingerprint and counts (never ids, UIDs or paths), for the
    # run records; MetricRecord holds numbers only, so they travel as a ConfigRecord.
    if site.info:
        content["site"] = ConfigRecord(site.info)
    keep_release(privacy, dataset_id, run, server_round, received, content)
    record_answered_round(context, server_round)
    return Message(content=content, reply_to=msg)


def handle_evaluate(
    msg: Message,
    context: Context,
    load_site: SiteLoader,
    load_privacy: SitePrivacyLoader = site_privacy_from_node_config,
) -> Message:
    """The global adapter on the site's validation split: metrics only (a segmentation
    round: Dice and HD95 over its validation cases, ``client.segmentation``).

    At a hospital with a run policy and a privacy policy only coarse metrics leave
    (``client.evaluation_cap``): rounded, and none at all for a validation set below the run
    policy's minimum (an error reply). Simulated hospitals have no run policy.
    """
    config = msg.content["config"]
    if is_segmentation(config):
        model, segmentation_site = prepare_segmentation(config, msg.content["arrays"], context)
        scores, count = (segmentation_scores(model, segmentation_site),
                         validation_count(segmentation_site))
    else:
        model, _, site = _prepare(msg, context, load_site)
        scores, count = evaluate(model, site.val.images, site.val.labels), len(site.val)
    run_policy = node_run_policy(context)
    if run_policy is not None and load_privacy(context).policy is not None:
        try:
            scores = released_metrics(scores, count, run_policy)
        except EvaluationRefusal as refusal:
            return Message(Error(code=RUN_REFUSAL_CODE, reason=str(refusal)), reply_to=msg)
    metrics = MetricRecord(
        {"num-examples": count, "hospital-id": hospital_id(context)}
        | {f"val-{name.replace('_', '-')}": value for name, value in scores.items()}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def declared_weight(msg: Message, context: Context, key: str, load_site: SiteLoader) -> float:
    """The averaging weight a hospital declares before a securely aggregated round: the
    value its training reply's metric ``key`` will hold (``num-examples``: its training-split
    size; ``update-weight``: 1 under client-level DP)."""
    if key == "update-weight":
        return 1.0
    if key == "num-examples" and is_segmentation(msg.content["config"]):
        return float(len(prepare_segmentation(msg.content["config"], None, context)[1].train))
    if key == "num-examples":
        image_size = from_config_record(ModelConfig, msg.content["config"]).image_size
        return float(len(load_site(context, image_size).train))
    raise ValueError(f"cannot declare a weight for metric '{key}'")


def build_client_app(
    load_site: SiteLoader = load_site_from_node_config,
    load_privacy: SitePrivacyLoader = site_privacy_from_node_config,
    load_identity: IdentityLoader = identity_from_node_config,
) -> AuditedClientApp:
    """A ClientApp whose hospitals get their data from ``load_site``, their privacy policy
    and ledger from ``load_privacy``, and their node key and consortium roster for secure
    aggregation from ``load_identity``.

    Every reply, whatever the handler and whether or not it raised, passes one egress point:
    ``audited_mod``, the outermost mod, which answers a failure with a category-only error and
    writes the egress audit line (node config 'audit-log') before the reply leaves; a message
    no handler is registered for is answered and audited the same way (:class:`AuditedClientApp`).
    """
    # The audit mod wraps the wire mod: what it logs is exactly what leaves (a packed adapter
    # is logged packed, its layout names the tensors).
    # Inside both, every coordinator value is typed and bounded before a handler reads it.
    app = AuditedClientApp(mods=[audited_mod, packed_wire_mod, typed_config_mod])

    def train_plain(msg: Message, context: Context) -> Message:
        # The hospital's run policy first (node config 'run-policy'), then the work.
        return refuse_run(msg, context) or handle_train(msg, context, load_site, load_privacy)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_plain(msg, context)

    def weight_of(msg: Message, context: Context, key: str) -> float:
        return declared_weight(msg, context, key, load_site)

    @app.train(SECAGG_ACTION)
    def train_secagg(msg: Message, context: Context) -> Message:
        # Secure aggregation's stages; the masked-input stage trains as ``train`` does. The
        # run policy is checked at setup, before any key is made.
        setup = msg.content.config_records.get("secagg", {}).get("stage") == "setup"
        return (setup and refuse_run(msg, context)) or handle_secagg(
            msg, context, train_plain, weight_of, load_identity)

    @app.query()
    def study_check(msg: Message, context: Context) -> Message:
        # Before round 1: a dry run of the study against this hospital's policies and data.
        return handle_study_check(msg, context, load_site, load_privacy, hospital_id(context))

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return refuse_run(msg, context) or handle_evaluate(msg, context, load_site,
                                                           load_privacy)

    return app


app = build_client_app()
