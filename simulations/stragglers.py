"""Simulated stragglers: hospitals whose training reply reaches the coordinator late.

A sampled hospital is slow in a round with a given probability: it trains as usual, but the
coordinator gets its reply ``delay_s`` seconds after it sent the round's messages. With
``federation.round_timeout_s`` below that delay the coordinator proceeds with the hospitals that
answered in time, and the strategy records the straggler as late (``strategies.adapter.LATE``),
not as a failure.

The delay is applied at the coordinator's end of the wire (:class:`StragglerGrid` holds the reply
back), not by the hospital sleeping: in a simulation hospitals share a few Ray actors, and a
sleeping actor would hold up the other hospitals queued on it (making them late too) and keep the
run from ending until it woke, where a real slow hospital is its own machine.

Who straggles is drawn from (seed, round, hospital), independently of dropouts, so a rerun does
the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from server.delegating_grid import PollingGrid
from simulations.draws import seeded_draw

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.25


def straggles(probability: float, seed: int, server_round: int, hospital: int) -> bool:
    """Whether ``hospital`` is slow in ``server_round``'s training (a draw independent of
    ``simulations.dropouts.drops_out``)."""
    return seeded_draw(probability, "straggler_probability", seed, server_round, hospital,
                       0x51A)


class StragglerGrid(PollingGrid):
    """Holds straggling hospitals' training replies back for ``delay_s`` seconds.

    Args:
        grid: the simulation's Flower grid.
        probability: chance that a hospital straggles in a round, in [0, 1].
        delay_s: seconds from sending a round's training message to the straggler's reply
            reaching the coordinator (>= 0).
        seed: the study's seed.
        poll_interval_s: seconds between looks for replies.
        clock: seconds, monotonic (tests pass their own to step time without waiting).

    A reply names its hospital (the ``hospital-id`` metric, the partition id in simulation);
    one without it (an error reply) is never held back.
    """

    def __init__(self, grid: Grid, probability: float, delay_s: float, seed: int,
                 poll_interval_s: float = POLL_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if delay_s < 0:
            raise ValueError(f"failures.straggler_delay_s must be >= 0, got {delay_s}")
        straggles(probability, seed, 0, 0)  # checks the probability
        super().__init__(grid, poll_interval_s)
        self.probability, self.delay_s, self.seed = probability, delay_s, seed
        self.clock = clock
        self._sent: dict[str, tuple[float, int]] = {}  # message id -> (sent at, round)
        self._held: dict[str, tuple[float, Message]] = {}  # message id -> (due at, reply)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        # What is still held or unanswered now came too late for its exchange: forget it.
        self._held.clear()
        self._sent.clear()
        ids = list(self._grid.push_messages(messages))
        now = self.clock()
        for message, message_id in zip(messages, ids, strict=True):
            if message_id and message.metadata.message_type == MessageType.TRAIN:
                config = message.content.config_records.get("config", {})
                self._sent[message_id] = (now, int(config.get("server-round", 0)))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        message_ids = set(message_ids)
        replies = []
        for reply in self._grid.pull_messages(message_ids - set(self._held)):
            request = reply.metadata.reply_to_message_id
            due = self._due(reply, *self._sent.pop(request, (0.0, 0)))
            if due is None:
                replies.append(reply)
            else:
                self._held[request] = (due, reply)
        now = self.clock()
        for request in message_ids & set(self._held):
            if self._held[request][0] <= now:
                replies.append(self._held.pop(request)[1])
        return replies

    def _due(self, reply: Message, sent_at: float, server_round: int) -> float | None:
        """When a straggler's ``reply`` may reach the coordinator; None when not held."""
        if self.delay_s == 0 or not sent_at or reply.has_error():
            return None
        metrics = reply.content.metric_records.get("metrics", {})
        if "hospital-id" not in metrics:
            return None
        hospital = int(metrics["hospital-id"])
        if not straggles(self.probability, self.seed, server_round, hospital):
            return None
        logger.info("hospital %d straggles in round %d: its reply reaches the coordinator "
                    "%.1f s after the round's start", hospital, server_round, self.delay_s)
        return sent_at + self.delay_s
