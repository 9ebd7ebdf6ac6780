"""Simulated hospital dropouts (stragglers: ``simulations.stragglers``).

Dropouts: a sampled hospital fails a round with a given probability. The failure is an error
reply, as a real hospital's crash or lost connection reaches the coordinator; the coordinator
records it and the round goes on when ``min_hospitals`` valid updates remain.

Who fails is drawn from (seed, round, hospital), so a rerun does the same.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from client.app import handle_evaluate, handle_train, hospital_id
from client.privacy_round import SitePrivacyLoader, site_privacy_from_node_config
from client.site import SiteLoader
from simulations.draws import seeded_draw

DROPOUT_CODE = 8001
"""Flower error code of a simulated dropout (distinct from privacy refusals)."""


def drops_out(probability: float, seed: int, server_round: int, hospital: int) -> bool:
    """Whether ``hospital`` fails in ``server_round`` (train and evaluate alike)."""
    return seeded_draw(probability, "dropout_probability", seed, server_round, hospital, 0xD20)


def _dropped(msg: Message, context: Context, probability: float, seed: int) -> Message | None:
    server_round = int(msg.content["config"].get("server-round", 0))
    hospital = hospital_id(context)
    if not drops_out(probability, seed, server_round, hospital):
        return None
    return Message(Error(code=DROPOUT_CODE,
                         reason=f"simulated dropout of hospital {hospital} in round "
                                f"{server_round}"), reply_to=msg)


def build_dropout_client_app(
    load_site: SiteLoader, probability: float, seed: int,
    load_privacy: SitePrivacyLoader = site_privacy_from_node_config,
) -> ClientApp:
    """``client.app``'s hospital, failing rounds with ``probability`` (seeded by ``seed``)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return (_dropped(msg, context, probability, seed)
                or handle_train(msg, context, load_site, load_privacy))

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return _dropped(msg, context, probability, seed) or handle_evaluate(msg, context,
                                                                            load_site)

    return app
