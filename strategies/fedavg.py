"""FedAvg over adapter tensors, weighted by each hospital's number of training examples."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.base import ReplyObserver, split_valid_replies


class AdapterFedAvg(FedAvg):
    """Flower's FedAvg, plus a check of every update and a report of every reply.

    Attributes:
        needs_only_sum: True: the weighted sum of updates is all this rule uses, so it can run
            under secure aggregation.
    """

    needs_only_sum = True

    def __init__(
        self,
        *args,
        observer: ReplyObserver | None = None,
        train_weighted_by_key: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.observer = observer
        # Issue 4: client-level DP averages updates uniformly (``update-weight`` = 1) while
        # evaluation metrics stay weighted by example counts.
        self.train_weighted_by_key = train_weighted_by_key or self.weighted_by_key
        self._global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = split_valid_replies(replies, server_round, "train", self._global, self.observer)
        evaluate_key, self.weighted_by_key = self.weighted_by_key, self.train_weighted_by_key
        try:
            return super().aggregate_train(server_round, valid)
        finally:
            self.weighted_by_key = evaluate_key

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        valid = split_valid_replies(replies, server_round, "evaluate", None, self.observer)
        return super().aggregate_evaluate(server_round, valid)
