"""The strategy interface every medfed rule shares, as a mixin over a Flower strategy.

A rule is ``class Rule(AdapterStrategy, FlowerStrategy)``: the mixin checks every update against
the global adapter (names, shapes, dtypes, finite values, optional norm bound), reports every
reply to the run records' observer, tells the hospitals which adapter tensors to send
(``adapter-exchange``) and puts the tensors that were not exchanged back into the new global
adapter; the Flower strategy does the arithmetic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from core.errors import MedfedError
from core.flower_compat import set_source_node
from models.lora_parts import check_exchange, exchanged_keys
from strategies.config import StrategyOptions
from strategies.replies import Reply, ReplyObserver, split_valid_replies

logger = logging.getLogger(__name__)

LATE = "late: no reply within the round timeout"
"""Why a hospital that was asked but did not answer in time has no update."""


class TooFewUpdates(MedfedError, RuntimeError):
    """A training round left with fewer valid updates than ``min_train_nodes`` (e.g.
    hospitals' privacy-budget refusals); the message names every dropped reply's reason."""


class AdapterStrategy:
    """Mixin for a Flower ``FedAvg`` subclass (put it first in the bases).

    Class attributes a rule sets:
        needs_only_sum: True when the rule uses only the weighted sum of the updates, so it can
            run under secure aggregation (the coordinator never sees one hospital's update).
        exchange: which adapter tensors hospitals train and send (see ``models.lora_parts``).

    Args:
        observer: called with every reply (used or not), for the run records.
        train_weighted_by_key: metric that weights training updates (default: the strategy's
            ``weighted_by_key``); client-level DP uses ``update-weight`` = 1 for all.
        options: the rules' settings; ``max_update_norm`` applies to every rule.
    """

    needs_only_sum: bool = True
    exchange: str = "all"

    def __init__(
        self,
        *args,
        observer: ReplyObserver | None = None,
        train_weighted_by_key: str | None = None,
        options: StrategyOptions | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_exchange(self.exchange)
        self.observer = observer
        self.options = options or StrategyOptions()
        # Client-level DP averages updates uniformly (``update-weight`` = 1) while
        # evaluation metrics stay weighted by example counts.
        self.train_weighted_by_key = train_weighted_by_key or self.weighted_by_key
        self._global: ArrayRecord | None = None
        self._asked: dict[str, list[int]] = {}
        self._sent: dict[str, list[Message]] = {}

    def exchanged(self, arrays: ArrayRecord) -> ArrayRecord:
        """The part of ``arrays`` hospitals send back under this rule's exchange."""
        if self.exchange == "all":
            return arrays
        return ArrayRecord({k: arrays[k] for k in exchanged_keys(list(arrays), self.exchange)})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays
        config["adapter-exchange"] = self.exchange
        return self._remember("train", super().configure_train(server_round, arrays, config,
                                                                grid))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # FedSA-LoRA hospitals evaluate with their own B: they need to know the mode.
        config["adapter-exchange"] = self.exchange
        return self._remember("evaluate", super().configure_evaluate(server_round, arrays,
                                                                      config, grid))

    def _remember(self, phase: str, messages: Iterable[Message]) -> list[Message]:
        """Keep which hospitals were asked in ``phase``, to record those who do not answer."""
        messages = list(messages)
        self._asked[phase] = [m.metadata.dst_node_id for m in messages]
        # The grid gives each message its id in place when it pushes it; kept to name the node
        # behind an error the SuperLink answers on a dead node's behalf.
        self._sent[phase] = messages
        return messages

    def record_late(self, server_round: int, phase: str, replies: Iterable[Message]
                    ) -> list[Message]:
        """``replies`` as a list; every hospital asked in ``phase`` without a reply among them
        (a straggler past the round timeout) is logged and reported to the observer as late,
        which the run records keep apart from failures."""
        replies = list(replies)
        node_of = {m.metadata.message_id: m.metadata.dst_node_id
                   for m in self._sent.pop(phase, []) if m.metadata.message_id}
        for reply in replies:
            # "Node Unavailable" errors come from the SuperLink (src node 1): record them
            # under the hospital that was asked.
            asked = node_of.get(reply.metadata.reply_to_message_id)
            if asked is not None and reply.metadata.src_node_id != asked:
                set_source_node(reply, asked)
        answered = {m.metadata.src_node_id for m in replies}
        for node in self._asked.pop(phase, []):
            if node not in answered:
                logger.warning("round %d: %s reply of node %d: %s", server_round, phase, node,
                               LATE)
                if self.observer is not None:
                    self.observer(Reply(server_round=server_round, phase=phase, node_id=node,
                                        error=LATE))
        return replies

    def prepare_updates(self, server_round: int, valid: list[Message]) -> list[Message]:
        """Hook for rules that change the valid updates before the Flower arithmetic
        (e.g. norm bounding); the default passes them through."""
        return valid

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = self.record_late(server_round, "train", replies)  # stragglers
        expected = self.exchanged(self._global) if self._global is not None else None
        dropped: list[str] = []

        def observe(reply: Reply) -> None:
            if reply.error:
                dropped.append(f"node {reply.node_id}: {reply.error}")
            if self.observer is not None:
                self.observer(reply)

        valid = split_valid_replies(replies, server_round, "train", expected, observe,
                                    self.options.max_update_norm)
        if len(valid) < self.min_train_nodes:
            # End the run now, naming why (e.g. privacy refusals), not rounds later.
            raise TooFewUpdates(
                f"round {server_round} got {len(valid)} valid updates, needs "
                f"{self.min_train_nodes}; {'; '.join(dropped) or 'no hospital answered'}")
        valid = self.prepare_updates(server_round, valid)
        evaluate_key, self.weighted_by_key = self.weighted_by_key, self.train_weighted_by_key
        try:
            arrays, metrics = super().aggregate_train(server_round, valid)
        finally:
            self.weighted_by_key = evaluate_key
        if arrays is not None and self._global is not None:
            # Tensors nobody sent (FFA's frozen A, FedSA's server-side B) keep their value, and
            # every tensor keeps the global dtype (Flower's FedOpt arithmetic yields float64).
            merged = ArrayRecord()
            for key, value in self._global.items():
                new = arrays[key].numpy() if key in arrays else value.numpy().copy()
                merged[key] = Array(new.astype(value.numpy().dtype, copy=False))
            arrays = merged
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = self.record_late(server_round, "evaluate", replies)  # stragglers
        valid = split_valid_replies(replies, server_round, "evaluate", None, self.observer)
        return super().aggregate_evaluate(server_round, valid)
