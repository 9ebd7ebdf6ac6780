"""How adapter updates are combined at the coordinator, selected by name.

Every rule is an :class:`~strategies.adapter.AdapterStrategy` over a Flower strategy and says
whether it needs only the weighted sum of the updates (``needs_only_sum``: it can then run under
secure aggregation).
"""

import core  # noqa: F401  (sets Flower environment defaults before Flower loads)
from strategies.adapter import AdapterStrategy
from strategies.config import StrategyOptions
from strategies.fedavg import AdapterFedAvg
from strategies.lora_rules import FedSALoRA, FFALoRA, HetLoRA
from strategies.optimizers import AdapterFedAdam, AdapterFedProx, AdapterFedYogi
from strategies.replies import Reply, ReplyObserver
from strategies.robust import AdapterFedMedian, AdapterNormBound, AdapterTrimmedMean

STRATEGIES: dict[str, type[AdapterStrategy]] = {
    "fedavg": AdapterFedAvg,
    "fedprox": AdapterFedProx,
    "fedadam": AdapterFedAdam,
    "fedyogi": AdapterFedYogi,
    "ffa-lora": FFALoRA,
    "fedsa-lora": FedSALoRA,
    "hetlora": HetLoRA,
    "median": AdapterFedMedian,
    "trimmed-mean": AdapterTrimmedMean,
    "norm-bound": AdapterNormBound,
}


def build_strategy(name: str, **kwargs) -> AdapterStrategy:
    """The strategy registered as ``name``, constructed with Flower's FedAvg keyword arguments
    plus ``observer``, ``train_weighted_by_key`` and ``options`` (:class:`StrategyOptions`)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy '{name}': choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](**kwargs)


__all__ = ["AdapterFedAvg", "AdapterStrategy", "Reply", "ReplyObserver", "STRATEGIES",
           "StrategyOptions", "build_strategy"]
