"""The hospital's Flower ClientApp: records in, records out; the work lives in plain functions.

train: load the global adapter, train on the site's training split, send back the new adapter
(and nothing else but the example count and the training loss). evaluate: the global adapter on
the site's validation split, metrics only.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.model_cache import lora_model_for
from client.site import SiteLoader, load_site_from_node_config
from client.training import train_local
from models.adapters import adapter_state, load_adapter_state
from models.config import ModelConfig, TrainConfig, from_config_record
from models.metrics import evaluate

logger = logging.getLogger(__name__)


def hospital_id(context: Context) -> int:
    """Numeric id for metrics: the simulation's partition id, else the Flower node id."""
    return int(context.node_config.get("partition-id", context.node_id))


def _prepare(msg: Message, context: Context, load_site: SiteLoader):
    config = msg.content["config"]
    model_config = from_config_record(ModelConfig, config)
    model = lora_model_for(model_config)
    load_adapter_state(model, msg.content["arrays"].to_torch_state_dict())
    return model, config, load_site(context, model_config.image_size)


def handle_train(msg: Message, context: Context, load_site: SiteLoader) -> Message:
    """Local training on the global adapter; the reply carries the new adapter and two numbers."""
    model, config, site = _prepare(msg, context, load_site)
    train_config = from_config_record(TrainConfig, config)
    server_round = int(config["server-round"])
    hospital = hospital_id(context)
    # Distinct per hospital and round, same on replay.
    seed = train_config.seed * 1_000_003 + server_round * 1_009 + hospital
    loss = train_local(model, site.train.images, site.train.labels, train_config, seed)
    metrics = MetricRecord(
        {"num-examples": len(site.train), "train-loss": loss, "hospital-id": hospital}
    )
    content = RecordDict({"arrays": ArrayRecord(adapter_state(model)), "metrics": metrics})
    # Issue 3: the site's dataset fingerprint and counts (never ids, UIDs or paths), for the
    # run records; MetricRecord holds numbers only, so they travel as a ConfigRecord.
    if site.info:
        content["site"] = ConfigRecord(site.info)
    return Message(content=content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, load_site: SiteLoader) -> Message:
    """The global adapter on the site's validation split: metrics only."""
    model, _, site = _prepare(msg, context, load_site)
    scores = evaluate(model, site.val.images, site.val.labels)
    metrics = MetricRecord(
        {"num-examples": len(site.val), "hospital-id": hospital_id(context)}
        | {f"val-{name.replace('_', '-')}": value for name, value in scores.items()}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def build_client_app(load_site: SiteLoader = load_site_from_node_config) -> ClientApp:
    """A ClientApp whose hospitals get their data from ``load_site``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, load_site)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, load_site)

    return app


app = build_client_app()
