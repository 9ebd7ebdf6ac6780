"""Where federation stands: the same LoRA trained on pooled data, and by each hospital alone.

Both baselines start from the federated run's initial adapter and get its training budget and
schedule: ``rounds`` rounds of ``local_epochs`` epochs over the data they hold, with the round's
learning rate and a fresh optimiser each round, as a hospital in the federation would. Each
publishes its adapter by the federated run's rule (``server.evaluation``): the round with the
best ``evaluation.select_by`` on the validation data it holds (pooled: every hospital's
validation split; local: the hospital's own), a tie going to the later round, with the study's
prior put back (``evaluation.prior``). Its test metrics are that round's.

The local baseline also names the **best single hospital**: the hospital whose own published
adapter scores highest on every hospital's validation splits together (the data the federated
run selects on; never the test set), with that adapter's test metrics, so a study shows whether
the federation beat its strongest member.

In a run with DP-SGD the baselines train with the same DP-SGD settings and the same epsilon per
data holder (the pooled data as one holder, each hospital alone as itself), so that
federated-vs-pooled measures federation, not privacy. Client-level DP on updates has no
counterpart without a federation and is left out of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord

from client.site import SiteData
from client.training import train_local
from models.adapters import adapter_state, load_adapter_state
from models.config import ModelConfig, TrainConfig, round_lr
from models.data import ImageSet
from models.metrics import METRIC_NAMES, evaluate
from privacy.accounting import Event, epsilon
from privacy.config import DPConfig
from privacy.dpsgd import plan_round, round_noise_multiplier, train_dpsgd
from server.evaluation import AdapterSelection, with_prior
from server.rounds import initial_model
from server.study import EvaluationConfig

logger = logging.getLogger(__name__)


def train_like_federation(
    model, data: ImageSet, train: TrainConfig, rounds: int, seed: int,
    after_round: Callable[[int], None] | None = None, dp: DPConfig | None = None,
) -> list[Event]:
    """``rounds`` rounds of local training on ``data``, with the federation's LR schedule;
    ``after_round(server_round)`` is called after each.

    With ``dp.dpsgd`` each round is a round of DP-SGD whose noise spends
    ``dp.dp_target_epsilon`` over the ``rounds`` rounds (or uses ``dp.dp_noise_multiplier``).

    Returns:
        The accounting events of the DP-SGD rounds (empty without DP-SGD).
    """
    events: list[Event] = []
    private = dp is not None and dp.dpsgd
    if private:  # every round is planned alike: derive the noise once (a bisection)
        plan = plan_round(len(data), train)
        noise = round_noise_multiplier(dp, plan, rounds)
    for server_round in range(1, rounds + 1):
        round_seed = seed * 1_009 + server_round
        lr = round_lr(train, server_round)
        if private:
            train_dpsgd(model, data.images, data.labels, train, dp, noise, round_seed, lr=lr)
            events.append((noise, plan.sample_rate, plan.steps))
        else:
            train_local(model, data.images, data.labels, train, seed=round_seed, lr=lr)
        if after_round is not None:
            after_round(server_round)
    return events


def _privacy(events: list[Event], dp: DPConfig | None) -> dict[str, float]:
    """``dp_epsilon`` and ``dp_delta`` spent by a baseline's DP-SGD (nothing without it)."""
    if dp is None or not events:
        return {}
    return {"dp_epsilon": epsilon(events, dp.dp_delta, dp.dp_accountant),
            "dp_delta": dp.dp_delta}


class _Published:
    """Scores a baseline's adapter after each round as the federated run does (the study's
    prior put back) and keeps the test metrics of the round its validation data selects.

    With ``test_each_round`` the test data is scored after every round (``test_auc_per_round``);
    without, only the selected round's adapter is, once, in :meth:`result` (the same metrics:
    scoring is deterministic).
    """

    def __init__(self, model, val: ImageSet, test: ImageSet, evaluation: EvaluationConfig,
                 num_classes: int, test_each_round: bool = True) -> None:
        self.model, self.val, self.test = model, val, test
        self.evaluation, self.num_classes = evaluation, num_classes
        self.test_each_round = test_each_round
        self.selection = AdapterSelection(evaluation.select_by)
        self.test_metrics: dict[str, float] = {}
        self.test_auc_per_round: list[float] = []
        self.selected_state: dict | None = None
        self.rounds = 0

    def __call__(self, server_round: int) -> None:
        self.rounds = server_round
        trained = adapter_state(self.model)
        published = with_prior(ArrayRecord(trained), self.evaluation.prior, self.num_classes)
        published_state = published.to_torch_state_dict()
        load_adapter_state(self.model, published_state)
        val = evaluate(self.model, self.val.images, self.val.labels) if len(self.val) else {}
        chosen = self.selection.consider(server_round, {f"val_{k}": v for k, v in val.items()})
        keep = chosen or self.selection.best_round == 0  # no validation result yet: the last
        if self.test_each_round:
            test = evaluate(self.model, self.test.images, self.test.labels)
            self.test_auc_per_round.append(test["auc"])
            if keep:
                self.test_metrics = test
        elif keep:
            self.selected_state = published_state
        load_adapter_state(self.model, trained)  # training goes on from the plain adapter

    def score_selected(self, data: ImageSet) -> dict[str, float]:
        """The selected round's published adapter (kept with ``test_each_round=False``)
        scored on ``data``."""
        trained = adapter_state(self.model)
        if self.selected_state is not None:
            load_adapter_state(self.model, self.selected_state)
        try:
            return evaluate(self.model, data.images, data.labels)
        finally:
            load_adapter_state(self.model, trained)

    def result(self) -> dict[str, object]:
        if not self.test_each_round and self.selected_state is not None:
            trained = adapter_state(self.model)
            load_adapter_state(self.model, self.selected_state)
            self.test_metrics = evaluate(self.model, self.test.images, self.test.labels)
            load_adapter_state(self.model, trained)
        return self.test_metrics | {"published_round": self.selection.best_round
                                    or self.rounds}


def pooled_baseline(
    sites: list[SiteData], test: ImageSet, model_config: ModelConfig, train: TrainConfig,
    rounds: int, dp: DPConfig | None = None, adapter: str = "", adapter_sha256: str = "",
    evaluation: EvaluationConfig | None = None,
) -> dict[str, float]:
    """All hospitals' training data in one place: test metrics of the adapter it publishes (the
    round with the best validation score on all hospitals' validation splits, as the federated
    run chooses), and its test AUC after each round (``test_auc_per_round``). Under
    ``dp.dpsgd`` also the epsilon it spent (``dp_epsilon``, ``dp_delta``). ``adapter``: the
    run's ``federation.initial_adapter`` (and its pin), the start both baselines share."""
    model = initial_model(model_config, train.seed, adapter, adapter_sha256)
    pooled = ImageSet.concat([s.train for s in sites])
    published = _Published(model, ImageSet.concat([s.val for s in sites]), test,
                           evaluation or EvaluationConfig(), model_config.num_classes)
    events = train_like_federation(model, pooled, train, rounds, seed=train.seed,
                                   after_round=published, dp=dp)
    return (published.result() | {"test_auc_per_round": published.test_auc_per_round}
            | _privacy(events, dp))


def local_baseline(
    sites: list[SiteData], test: ImageSet, model_config: ModelConfig, train: TrainConfig,
    rounds: int, dp: DPConfig | None = None, adapter: str = "", adapter_sha256: str = "",
    evaluation: EvaluationConfig | None = None,
) -> dict[str, object]:
    """Each hospital alone, publishing by the federated run's rule on its own validation split:
    the mean of their test metrics, and each one's; under ``dp.dpsgd`` the epsilon each spent,
    and the largest as ``dp_epsilon``; ``best_hospital``: the one whose adapter scores best on
    all hospitals' validation splits (:func:`best_hospital`)."""
    evaluation = evaluation or EvaluationConfig()
    model = initial_model(model_config, train.seed, adapter, adapter_sha256)
    start = adapter_state(model)
    all_val = ImageSet.concat([s.val for s in sites])
    per_hospital, val_scores = [], []
    for hospital, site in enumerate(sites):
        load_adapter_state(model, start)
        published = _Published(model, site.val, test, evaluation,
                               model_config.num_classes, test_each_round=False)
        events = train_like_federation(model, site.train, train, rounds,
                                       seed=train.seed + hospital, after_round=published, dp=dp)
        val_scores.append(published.score_selected(all_val)[evaluation.select_by])
        per_hospital.append(published.result() | _privacy(events, dp) | {
            f"all_val_{evaluation.select_by}": val_scores[-1]})
        logger.debug("local baseline, hospital %d: %s", hospital, per_hospital[-1])
    mean = {name: float(np.nanmean([m[name] for m in per_hospital])) for name in METRIC_NAMES}
    if dp is not None and dp.dpsgd:  # the most any hospital alone spent
        mean["dp_epsilon"] = max(m["dp_epsilon"] for m in per_hospital)
    best = best_hospital(val_scores, evaluation.select_by)
    return mean | {"per_hospital": per_hospital, "best_hospital": (
        per_hospital[best] | {"hospital": best, "train_examples": len(sites[best].train)})}


def best_hospital(val_scores: list[float], metric: str) -> int:
    """Index of the hospital whose alone-trained adapter has the highest ``metric`` on every
    hospital's validation splits together (a tie goes to the earlier hospital; an undefined
    score never wins).

    Raises:
        ValueError: no hospital's score is defined.
    """
    defined = [(v, -k) for k, v in enumerate(val_scores) if np.isfinite(v)]
    if not defined:
        raise ValueError(f"no hospital's adapter has a defined validation {metric}")
    return -max(defined)[1]
