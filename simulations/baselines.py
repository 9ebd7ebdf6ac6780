"""Where federation stands: the same LoRA trained on pooled data, and by each hospital alone.

Both baselines start from the federated run's initial adapter and get its training budget and
schedule: ``rounds`` rounds of ``local_epochs`` epochs over the data they hold, with the round's
learning rate and a fresh optimiser each round, as a hospital in the federation would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from client.site import SiteData
from client.training import train_local
from models.adapters import adapter_state, load_adapter_state
from models.config import ModelConfig, TrainConfig, round_lr
from models.data import ImageSet
from models.metrics import evaluate
from server.rounds import initial_model

logger = logging.getLogger(__name__)

METRIC_NAMES = ("loss", "auc", "accuracy", "macro_f1")


def train_like_federation(
    model, data: ImageSet, train: TrainConfig, rounds: int, seed: int,
    after_round: Callable[[int], None] | None = None,
) -> None:
    """``rounds`` rounds of local training on ``data``, with the federation's LR schedule;
    ``after_round(server_round)`` is called after each."""
    for server_round in range(1, rounds + 1):
        train_local(model, data.images, data.labels, train, seed=seed * 1_009 + server_round,
                    lr=round_lr(train, server_round))
        if after_round is not None:
            after_round(server_round)


def pooled_baseline(
    sites: list[SiteData], test: ImageSet, model_config: ModelConfig, train: TrainConfig,
    rounds: int,
) -> dict[str, float]:
    """All hospitals' training data in one place: test metrics of the adapter trained on it,
    and its test AUC after each round (``test_auc_per_round``): on PneumoniaMNIST, whose test
    split is shifted from its training split, the last round can swing far from the others."""
    model = initial_model(model_config, train.seed)
    pooled = ImageSet.concat([s.train for s in sites])
    per_round: list[dict[str, float]] = []
    train_like_federation(
        model, pooled, train, rounds, seed=train.seed,
        after_round=lambda _: per_round.append(evaluate(model, test.images, test.labels)))
    # The last round's evaluation is the final one: the model does not change after it.
    return per_round[-1] | {"test_auc_per_round": [m["auc"] for m in per_round]}


def local_baseline(
    sites: list[SiteData], test: ImageSet, model_config: ModelConfig, train: TrainConfig,
    rounds: int,
) -> dict[str, object]:
    """Each hospital alone: the mean of their test metrics, and each one's."""
    model = initial_model(model_config, train.seed)
    start = adapter_state(model)
    per_hospital = []
    for hospital, site in enumerate(sites):
        load_adapter_state(model, start)
        train_like_federation(model, site.train, train, rounds, seed=train.seed + hospital)
        per_hospital.append(evaluate(model, test.images, test.labels))
        logger.debug("local baseline, hospital %d: %s", hospital, per_hospital[-1])
    mean = {name: float(np.nanmean([m[name] for m in per_hospital])) for name in METRIC_NAMES}
    return mean | {"per_hospital": per_hospital}
