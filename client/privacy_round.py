"""A hospital's private round: budget check, DP-SGD or plain training, update DP, ledger entry.

The site's side of differential privacy. The coordinator proposes the mechanism (``DPConfig`` in
the round's config); the hospital's own policy and ledger decide whether the round may run. The
order is what makes the ledger trustworthy: dry-run the round's cost -> train -> clip and noise
the update -> record the round atomically -> only then release the reply.

A hospital's privacy settings come from its node config:
``privacy-policy`` (path to the site policy TOML), ``privacy-ledger`` (path to the SQLite ledger),
``dataset-fingerprint`` (the site's name for the dataset; default: a hash of the training data).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Context
from torch import nn

from client.training import train_local
from models.adapters import adapter_state, load_adapter_state
from models.config import TrainConfig
from models.data import ImageSet
from privacy.accounting import epsilon, history_from_record, history_to_record
from privacy.config import DPConfig
from privacy.dpsgd import plan_round, round_noise_multiplier, train_dpsgd
from privacy.ledger import BudgetExceeded, Charge, Ledger
from privacy.policy import SitePolicy, load_site_policy
from privacy.update_dp import clip_and_noise, update_charge

logger = logging.getLogger(__name__)

STATE_KEY = "dp-accountant"
"""Key of this run's accounting events in the ClientApp's ``context.state``."""
REFUSAL_CODE = 403
"""Flower error code of a round the hospital's privacy policy refused."""


class PrivacyRefusal(RuntimeError):
    """The hospital will not run (or release) this round; the message says why."""


@dataclass(frozen=True)
class SitePrivacy:
    """A hospital's privacy policy and ledger; both ``None`` where the site set none.

    Attributes:
        policy: budget and delta per dataset.
        ledger: where rounds are recorded (required with a policy).
        fingerprint: the dataset's name in the ledger; empty: hash the training data.
    """

    policy: SitePolicy | None = None
    ledger: Ledger | None = None
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if self.policy is not None and self.ledger is None:
            raise ValueError("a site policy needs a ledger: set 'privacy-ledger' in the node "
                             "config to a path for the SQLite ledger")


SitePrivacyLoader = Callable[[Context], SitePrivacy]
"""Gives a hospital's privacy policy and ledger: ``context -> SitePrivacy``."""


def site_privacy_from_node_config(context: Context) -> SitePrivacy:
    """The hospital daemon's policy, ledger and fingerprint, from its node config."""
    config = context.node_config
    policy = config.get("privacy-policy")
    ledger = config.get("privacy-ledger")
    return SitePrivacy(
        policy=load_site_policy(Path(str(policy))) if policy else None,
        ledger=Ledger(Path(str(ledger))) if ledger else None,
        fingerprint=str(config.get("dataset-fingerprint", "")),
    )


def dataset_fingerprint(data: ImageSet) -> str:
    """sha256 of the training labels and images as trained on (a site should rather name its
    dataset with ``dataset-fingerprint``: this hash changes with the image size)."""
    digest = hashlib.sha256()
    digest.update(data.labels.numpy().tobytes())
    digest.update(data.images.contiguous().numpy().tobytes())
    return digest.hexdigest()


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


def check_budget(privacy: SitePrivacy, fingerprint: str, charges: list[Charge]) -> None:
    """Refuse the round when the site policy cannot afford it (a dry run; writes nothing)."""
    policy = privacy.policy
    if policy is None or privacy.ledger is None:
        return
    if not charges:
        raise PrivacyRefusal("site policy refuses a round without differential privacy "
                             "(it would spend an unbounded epsilon)")
    total = privacy.ledger.projected_epsilon(fingerprint, charges, policy.delta,
                                             policy.accountant)
    if total > policy.max_epsilon:
        spent = privacy.ledger.projected_epsilon(fingerprint, [], policy.delta,
                                                 policy.accountant)
        raise PrivacyRefusal(
            f"privacy budget: this round would bring epsilon on dataset {fingerprint[:12]} "
            f"from {spent:.3f} to {total:.3f}, past the site budget {policy.max_epsilon:g} "
            f"(delta {policy.delta:g})"
        )


def train_round(
    model: nn.Module,
    train: ImageSet,
    train_config: TrainConfig,
    dp: DPConfig,
    privacy: SitePrivacy,
    context: Context,
    server_round: int,
    seed: int,
    lr: float | None = None,
    data_fingerprint: str = "",
) -> tuple[float, dict[str, float]]:
    """One round of local training under the run's DP settings and the site's policy.

    Without DP and without a site policy this is exactly :func:`client.training.train_local`.
    ``lr`` is the round's learning rate; ``data_fingerprint`` names the dataset in the ledger
    when the node config does not (default: a hash of the training data).

    Returns:
        The mean training loss and the metrics the reply adds: ``dp-epsilon`` (this run's
        epsilon at this hospital so far, composed over its rounds with the run's accountant) and
        ``dp-delta``; ``update-weight`` = 1 with client-level DP (uniform averaging).

    Raises:
        PrivacyRefusal: the site policy refuses the round; nothing was released or recorded.
    """
    if not (dp.dpsgd or dp.update_dp) and privacy.policy is None:
        return train_local(model, train.images, train.labels, train_config, seed, lr=lr), {}
    charges = plan_charges(dp, len(train), train_config)
    fingerprint = privacy.fingerprint or data_fingerprint or dataset_fingerprint(train)
    check_budget(privacy, fingerprint, charges)

    reference = adapter_state(model) if dp.update_dp else None
    if dp.dpsgd:
        loss = train_dpsgd(model, train.images, train.labels, train_config, dp,
                           charges[0].noise_multiplier, seed, lr=lr).loss
    else:
        loss = train_local(model, train.images, train.labels, train_config, seed, lr=lr)
    if reference is not None:
        noisy = clip_and_noise(adapter_state(model), reference, dp.update_clip_norm,
                               dp.update_noise_multiplier, dp.update_hospitals,
                               torch.Generator().manual_seed(seed + 2))
        load_adapter_state(model, noisy)

    if privacy.ledger is not None and charges:
        policy = privacy.policy
        try:
            total = privacy.ledger.record_round(
                fingerprint, str(context.run_id), server_round, charges,
                delta=policy.delta if policy else dp.dp_delta,
                accountant=policy.accountant if policy else dp.dp_accountant,
                budget=policy.max_epsilon if policy else float("inf"),
            )
        except BudgetExceeded as err:
            raise PrivacyRefusal(f"privacy budget: {err}") from err
        logger.info("ledger: dataset %s at epsilon %.3f after round %d", fingerprint[:12],
                    total, server_round)
    history = history_from_record(context.state.config_records.get(STATE_KEY))
    history += [c.event for c in charges]
    context.state[STATE_KEY] = history_to_record(history)
    metrics = {"dp-epsilon": epsilon(history, dp.dp_delta, dp.dp_accountant),
               "dp-delta": dp.dp_delta}
    if dp.update_dp:
        metrics["update-weight"] = 1.0
    return loss, metrics
