"""FedAvg over adapter tensors, weighted by each hospital's number of training examples."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from strategies.adapter import AdapterStrategy


class AdapterFedAvg(AdapterStrategy, FedAvg):
    """Flower's FedAvg, plus a check of every update and a report of every reply.

    Attributes:
        needs_only_sum: True: the weighted sum of updates is all this rule uses, so it can run
            under secure aggregation.
    """

    needs_only_sum = True
