"""A hospital's private round: budget check, DP-SGD or plain training, update DP, ledger entry.

The site's side of differential privacy. The coordinator proposes the mechanism (``DPConfig`` in
the round's config); the hospital's own policy and ledger decide whether the round may run. The
order is what makes the ledger trustworthy: dry-run the round's cost -> train -> clip and noise
the update -> record the round atomically -> only then release the reply.

A hospital's privacy settings come from its node config (never from the coordinator):
``privacy-policy`` (path to the site policy TOML), ``privacy-ledger`` (path to the SQLite ledger),
``dataset-id`` (the name the hospital gives the dataset; its budget is kept under it). A DP round
under a site policy without ``dataset-id`` is refused. ``insecure-replayable-noise`` (simulations
only; a hospital daemon refuses it) draws the noise from the run's seed so a study replays.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context
from torch import nn

from client.training import train_local
from core.errors import MedfedError
from models.adapters import adapter_state, load_adapter_state
from models.config import TrainConfig
from models.data import ImageSet
from models.finite import check_finite_tensors
from models.segmentation import SliceSet
from privacy.accounting import epsilon, history_from_record, history_to_record
from privacy.config import DPConfig
from privacy.dpsgd import plan_round, round_noise_multiplier, train_dpsgd
from privacy.ledger import BudgetExceeded, Charge, Ledger
from privacy.noise import INSECURE_NOISE_KEY, noise_source
from privacy.policy import SitePolicy, load_site_policy
from privacy.update_dp import clip_and_noise, update_charge

logger = logging.getLogger(__name__)

STATE_KEY = "dp-accountant"
"""Key of this run's example-level accounting events in the ClientApp's ``context.state``
(used only without a ledger)."""
REFUSAL_CODE = 403
"""Flower error code of a round the hospital's privacy policy refused."""
DATASET_ID_KEY = "dataset-id"
"""Node-config key: the dataset's name in the ledger (``dataset_id`` in ``hospital.toml``)."""
RUN_KEY = "run-key"
"""Round-config key the coordinator sends: the same for a run and its resumptions. Only names
"this run" for the reply's ``dp-epsilon``; every budget is over the whole dataset."""


class PrivacyRefusal(MedfedError, RuntimeError):
    """The hospital will not run (or release) this round; the message says why."""


@dataclass(frozen=True)
class SitePrivacy:
    """A hospital's privacy policy and ledger; both ``None`` where the site set none.

    Attributes:
        policy: budget and delta per dataset.
        ledger: where rounds are recorded (required with a policy).
        dataset_id: the dataset's name in the ledger, declared by the hospital; required for
            a private round under a policy (without a policy: a hash of the training data).
        insecure_replayable_noise: draw DP noise from the run's seed (simulations only).
    """

    policy: SitePolicy | None = None
    ledger: Ledger | None = None
    dataset_id: str = ""
    insecure_replayable_noise: bool = False

    def __post_init__(self) -> None:
        if self.policy is not None and self.ledger is None:
            raise ValueError("a site policy needs a ledger: set 'privacy-ledger' in the node "
                             "config to a path for the SQLite ledger")


SitePrivacyLoader = Callable[[Context], SitePrivacy]
"""Gives a hospital's privacy policy and ledger: ``context -> SitePrivacy``."""


def site_privacy_from_node_config(context: Context) -> SitePrivacy:
    """The hospital daemon's policy, ledger and dataset id, from its node config.

    Raises:
        privacy.ledger.LedgerIntegrityError: the ledger was deleted or edited.
    """
    config = context.node_config
    policy = config.get("privacy-policy")
    ledger = config.get("privacy-ledger")
    insecure = config.get(INSECURE_NOISE_KEY, False)
    if not isinstance(insecure, bool):
        raise ValueError(f"node config '{INSECURE_NOISE_KEY}' must be true or false")
    return SitePrivacy(
        policy=load_site_policy(Path(str(policy))) if policy else None,
        ledger=Ledger(Path(str(ledger))) if ledger else None,
        dataset_id=str(config.get(DATASET_ID_KEY, "")),
        insecure_replayable_noise=insecure,
    )


def dataset_fingerprint(data: ImageSet) -> str:
    """sha256 of the training labels and images as trained on: the ledger's key only where no
    policy is in force (it changes with the image size, so it cannot hold a budget)."""
    digest = hashlib.sha256()
    digest.update(data.labels.numpy().tobytes())
    digest.update(data.images.contiguous().numpy().tobytes())
    return digest.hexdigest()


def ledger_dataset_id(privacy: SitePrivacy, data_fingerprint: str,
                      train: ImageSet | SliceSet) -> str:
    """The name a round's charges go under in the ledger: the hospital's ``dataset-id``, else
    the site's data fingerprint, else a hash of the training data."""
    return privacy.dataset_id or data_fingerprint or dataset_fingerprint(train)


def is_private(dp: DPConfig, privacy: SitePrivacy) -> bool:
    """The round runs a DP mechanism or falls under a site privacy policy: then nothing but
    the noised adapter and counts leaves (the training loss stays at the hospital)."""
    return dp.dpsgd or dp.update_dp or privacy.policy is not None


def plan_charges(dp: DPConfig, num_examples: int, train_config: TrainConfig) -> list[Charge]:
    """What the round will cost: one charge per DP mechanism it runs (none without DP)."""
    charges = []
    if dp.dpsgd:
        plan = plan_round(num_examples, train_config)
        z = round_noise_multiplier(dp, plan, dp.dp_run_rounds)
        charges.append(Charge("dpsgd", z, plan.sample_rate, plan.steps, dp.dp_max_grad_norm))
    if dp.update_dp:
        if dp.update_hospitals < 1:
            raise ValueError("update_hospitals must be >= 1 (the coordinator sets it)")
        charges.append(update_charge(dp.update_clip_norm, dp.update_noise_multiplier,
                                     dp.update_hospitals, dp.update_min_sum_size))
    return charges


def check_budget(privacy: SitePrivacy, dataset_id: str, charges: list[Charge]) -> None:
    """Refuse the round when the site policy cannot afford it (a dry run; writes nothing)."""
    policy = privacy.policy
    if policy is None or privacy.ledger is None:
        return
    if not charges:
        if policy.require_dp:
            raise PrivacyRefusal("site policy refuses a round without differential privacy "
                                 "(it would spend an unbounded epsilon)")
        return  # require_dp = false: the hospital takes non-private rounds; nothing to spend
    total = privacy.ledger.projected_epsilon(dataset_id, charges, policy.delta,
                                             policy.accountant)
    if total > policy.max_epsilon:
        spent = privacy.ledger.projected_epsilon(dataset_id, [], policy.delta,
                                                 policy.accountant)
        raise PrivacyRefusal(
            f"privacy budget: this round would bring epsilon on this dataset from {spent:.3f} "
            f"to {total:.3f}, past the site budget {policy.max_epsilon:g} (delta "
            f"{policy.delta:g})"
        )


def check_delta(dp: DPConfig, policy: SitePolicy | None, num_examples: int) -> float:
    """The delta the round is accounted at; refuse one above the policy's or above ``1/N``.

    A delta of ``1/N`` or more allows a mechanism that publishes one of the ``N`` training
    examples outright, whatever epsilon says.
    """
    if policy is not None and dp.dp_delta > policy.delta:
        raise PrivacyRefusal(f"the run asks for delta {dp.dp_delta:g}, above the site "
                             f"policy's {policy.delta:g}")
    delta = policy.delta if policy is not None else dp.dp_delta
    if delta * num_examples > 1:
        raise PrivacyRefusal(f"delta {delta:g} is above 1/N for this hospital's "
                             f"{num_examples} training examples: lower delta below "
                             f"{1 / num_examples:.2g}")
    return delta


LocalTrain = Callable[[nn.Module, TrainConfig, int, float | None], float]
"""A task's own local training: ``(model, train_config, seed, lr) -> mean loss`` (e.g.
``client.segmentation.segmentation_trainer``); it never runs DP-SGD."""


def _train_private(model: nn.Module, train: ImageSet | SliceSet, train_config: TrainConfig,
                   dp: DPConfig, charges: list[Charge], seed: int, lr: float | None, noise,
                   local_train: LocalTrain | None = None) -> float:
    """DP-SGD or plain local training, then client-level DP on the update; the trained
    adapter finite or refused (before the ledger: a refused update is never released, so the
    round is not charged; the refusal says only that this round's update was not finite).
    Returns the mean training loss."""
    reference = adapter_state(model) if dp.update_dp else None
    if local_train is not None:
        loss = local_train(model, train_config, seed, lr)
    elif dp.dpsgd:
        loss = train_dpsgd(model, train.images, train.labels, train_config, dp,
                           charges[0].noise_multiplier, seed, lr=lr, noise=noise).loss
    else:
        loss = train_local(model, train.images, train.labels, train_config, seed, lr=lr)
    if reference is not None:
        noisy = clip_and_noise(adapter_state(model), reference, dp.update_clip_norm,
                               dp.update_noise_multiplier, dp.update_hospitals, noise)
        load_adapter_state(model, noisy)
    check_finite_tensors(adapter_state(model), "the trained adapter")
    return loss


def _record(privacy: SitePrivacy, context: Context, dataset_id: str, run: str,
            server_round: int, charges: list[Charge], delta: float,
            dp: DPConfig) -> dict[str, float]:
    """Charge the round (the ledger, atomically; else this run's history in
    ``context.state``) and return the reply's ``dp-epsilon``/``dp-delta`` (and
    ``update-weight`` under client-level DP).

    Raises:
        PrivacyRefusal: the ledger refuses the charge (over budget).
    """
    policy = privacy.policy
    metrics: dict[str, float] = {}
    if privacy.ledger is not None and charges:
        try:
            total = privacy.ledger.record_round(
                dataset_id, run, server_round, charges, delta=delta,
                accountant=policy.accountant if policy else dp.dp_accountant,
                budget=policy.max_epsilon if policy else float("inf"),
            )
        except BudgetExceeded as err:
            raise PrivacyRefusal(f"privacy budget: {err}") from err
        logger.info("ledger: dataset %s at epsilon %.3f after round %d", dataset_id[:24],
                    total, server_round)
        spent = privacy.ledger.run_epsilon(dataset_id, run)
        if spent is not None:
            metrics = {"dp-epsilon": spent[0], "dp-delta": spent[1]}
    if not metrics and charges:  # a round without DP has no epsilon to report (not 0)
        history = history_from_record(context.state.config_records.get(STATE_KEY))
        history += [c.example_event for c in charges]
        context.state[STATE_KEY] = history_to_record(history)
        metrics = {"dp-epsilon": epsilon(history, delta, dp.dp_accountant), "dp-delta": delta}
    if dp.update_dp:
        metrics["update-weight"] = 1.0
    return metrics


def train_round(
    model: nn.Module,
    train: ImageSet | SliceSet,
    train_config: TrainConfig,
    dp: DPConfig,
    privacy: SitePrivacy,
    context: Context,
    server_round: int,
    seed: int,
    lr: float | None = None,
    data_fingerprint: str = "",
    run_key: str = "",
    local_train: LocalTrain | None = None,
    privacy_units: int | None = None,
) -> tuple[float, dict[str, float]]:
    """One round of local training under the run's DP settings and the site's policy.

    Without DP and without a site policy this is exactly :func:`client.training.train_local`.
    ``lr`` is the round's learning rate; ``data_fingerprint`` names the dataset in a ledger
    without a policy when the hospital declared no ``dataset-id`` (default: a hash of the
    training data). ``seed`` seeds batch order and dropout; the DP noise comes from a CSPRNG at
    the hospital (``privacy.noise``), or from ``seed`` only under
    ``insecure_replayable_noise``. ``run_key`` names this run across coordinator restarts
    (default: the Flower run id). ``local_train`` replaces :func:`client.training.train_local`
    (a task's own loop, which never runs DP-SGD); ``privacy_units`` counts the privacy units
    of ``train`` for the delta check (default ``len(train)``; a segmentation hospital's
    patients, not its slices).

    Returns:
        The mean training loss (the caller withholds it from a private round's reply) and the
        metrics the reply adds: ``dp-epsilon`` (this run's example-level epsilon on this
        dataset so far: from the ledger when there is one, so the same after a coordinator
        restart; else from ``context.state``) and ``dp-delta``; ``update-weight`` = 1 with
        client-level DP (uniform averaging).

    Raises:
        PrivacyRefusal: the site policy refuses the round; nothing was released or recorded.
    """
    if not is_private(dp, privacy):
        if local_train is not None:
            return local_train(model, train_config, seed, lr), {}
        return train_local(model, train.images, train.labels, train_config, seed, lr=lr), {}
    units = len(train) if privacy_units is None else privacy_units
    charges = plan_charges(dp, units, train_config)
    policy = privacy.policy
    if policy is not None and charges and not privacy.dataset_id:
        raise PrivacyRefusal(
            "this hospital declared no dataset id, so it cannot keep a privacy budget: its "
            "operator must set dataset_id in hospital.toml (node config 'dataset-id')")
    dataset_id = ledger_dataset_id(privacy, data_fingerprint, train)
    check_budget(privacy, dataset_id, charges)
    delta = check_delta(dp, policy, units) if charges else dp.dp_delta
    noise = noise_source(privacy.insecure_replayable_noise, seed)
    if privacy.insecure_replayable_noise:
        logger.warning("DP noise drawn from the run's seed (insecure_replayable_noise): anyone "
                       "who knows the seed can remove it; simulations only")

    loss = _train_private(model, train, train_config, dp, charges, seed, lr, noise, local_train)
    run = run_key or str(context.run_id)
    metrics = _record(privacy, context, dataset_id, run, server_round, charges, delta, dp)
    if dp.update_dp:
        metrics["update-weight"] = 1.0
    return loss, metrics
