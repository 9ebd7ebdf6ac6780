"""A hostile or faulty simulated hospital, for testing robust aggregation rules.

:class:`UpdateAttack` is a Flower ClientApp mod: after the hospital trains, it replaces the
reply's adapter by ``global + factor * (new - global)`` (``factor`` < 0 flips the update's sign,
a large ``factor`` scales it), as a broken or malicious site might. It may also lie about its
``num-examples``: the count is self-reported, so a weighted mean gives a liar the weight it claims.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client.app import handle_evaluate, handle_train
from client.privacy_round import SitePrivacyLoader
from client.site import SiteLoader

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateAttack:
    """Distort the training replies of the hospital with partition id ``hospital``.

    Attributes:
        hospital: partition id of the attacking hospital.
        factor: multiplies the hospital's update ``new - global`` (-1: sign flip).
        claimed_examples: ``num-examples`` the reply claims (0: the true count).
    """

    hospital: int
    factor: float
    claimed_examples: int = 0

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        if (msg.metadata.message_type != "train" or reply.has_error()
                or int(context.node_config.get("partition-id", -1)) != self.hospital):
            return reply
        sent, start = reply.content["arrays"], msg.content["arrays"]
        distorted = ArrayRecord()
        for name, array in sent.items():
            base = start[name].numpy()
            value = base + self.factor * (array.numpy() - base)
            distorted[name] = Array(np.asarray(value, dtype=array.numpy().dtype))
        reply.content["arrays"] = distorted
        if self.claimed_examples > 0:
            reply.content["metrics"]["num-examples"] = self.claimed_examples
        return reply


def attacked_client_app(
    load_site: SiteLoader, load_privacy: SitePrivacyLoader, attack: UpdateAttack
) -> ClientApp:
    """The hospitals' ClientApp (as :func:`client.app.build_client_app`) with ``attack``."""
    app = ClientApp(mods=[attack])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, load_site, load_privacy)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, load_site)

    return app
