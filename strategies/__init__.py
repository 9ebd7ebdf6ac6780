"""How adapter updates are combined at the coordinator, selected by name."""

import models  # noqa: F401  (sets Flower environment defaults before Flower loads)
from strategies.base import Reply, ReplyObserver
from strategies.fedavg import AdapterFedAvg

STRATEGIES = {"fedavg": AdapterFedAvg}


def build_strategy(name: str, **kwargs) -> AdapterFedAvg:
    """The strategy registered as ``name``, constructed with Flower's FedAvg keyword arguments."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy '{name}': choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](**kwargs)


__all__ = ["AdapterFedAvg", "Reply", "ReplyObserver", "STRATEGIES", "build_strategy"]
