"""DP-SGD at a hospital with opacus: per-example clipping and Gaussian noise on the adapter.

Only the trainable tensors (LoRA factors and the task head) get per-example gradients; the frozen
backbone, BatchNorm included (kept in eval mode on its pretrained statistics by
``models.lora.freeze_batchnorm``), never sees a gradient, so opacus' ``ModuleValidator`` has
nothing to object to (BatchNorm mixes examples only when it trains).

Privacy unit: one training example of this hospital. Batches are Poisson-sampled (each example
joins each step independently with rate ``q``, about ``batch_size / N``) as the accountant assumes.

Randomness: the Gaussian noise and the Poisson sampling come from the round's
:class:`privacy.noise.NoiseSource` (a CSPRNG at the hospital, ``privacy.noise.SecureNoise``), not
from opacus' generators: opacus' own ``secure_mode`` needs ``torchcsprng`` (last release 0.2.1,
2021, built for torch 1.8; pip finds no distribution of it for this environment), and a seeded
``torch.Generator`` keeps only 32 bits of its seed. The
``seed`` argument seeds only what protects no one (dropout, augmentation shifts in replay mode).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models.config import TrainConfig
from models.finite import NonFiniteError
from models.lora import freeze_batchnorm
from privacy.accounting import noise_for_target
from privacy.augmult import average_view_gradients, shifted_views
from privacy.config import DPConfig
from privacy.grad_samplers import engine_module
from privacy.noise import NoiseSource, SecureNoise

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepPlan:
    """What one round of DP-SGD at a hospital will run.

    Attributes:
        sample_rate: Poisson sampling rate ``q`` of each example at each step.
        steps: optimiser steps in the round.
    """

    sample_rate: float
    steps: int


@dataclass(frozen=True)
class DPTrainResult:
    """Outcome of one round of DP-SGD.

    Attributes:
        loss: mean training loss over the round's examples (not private: it stays at the
            hospital; the ClientApp withholds it from a private round's reply).
        noise_multiplier: the noise std over the clipping norm that was used.
        plan: the sample rate and steps the accountant must be charged with.
    """

    loss: float
    noise_multiplier: float
    plan: StepPlan


def plan_round(num_examples: int, config: TrainConfig) -> StepPlan:
    """Sample rate and steps of one round, exactly as opacus' Poisson loader runs them.

    opacus samples at ``q = 1 / ceil(N / batch_size)`` and an epoch is ``ceil(N / batch_size)``
    steps; a round is ``config.local_steps`` steps, or ``local_epochs`` such epochs.
    """
    if num_examples <= 0:
        raise ValueError("no training examples at this hospital")
    batches = math.ceil(num_examples / config.batch_size)
    return StepPlan(sample_rate=1.0 / batches,
                    steps=config.local_steps or config.local_epochs * batches)


def round_noise_multiplier(dp: DPConfig, plan: StepPlan, rounds: int) -> float:
    """Noise multiplier of a round planned as ``plan``: ``dp.dp_noise_multiplier`` when set,
    else the one at which ``rounds`` such rounds together spend ``dp.dp_target_epsilon``."""
    if dp.dp_noise_multiplier > 0:
        return dp.dp_noise_multiplier
    if rounds < 1:
        raise ValueError("dp_target_epsilon needs dp_run_rounds (the coordinator sets it to the "
                         "run's rounds)")
    return noise_for_target(dp.dp_target_epsilon, dp.dp_delta, plan.sample_rate,
                            plan.steps * rounds, dp.dp_accountant)


def check_private_model(model: nn.Module) -> None:
    """Raise when opacus cannot give per-example gradients for ``model``'s trainable modules.

    Call with the model in training mode; frozen modules (the backbone, BatchNorm) are not
    checked, as they get no gradient.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model is not DP-SGD compatible: {errors[:3]}")


def make_optimizer(params: list[torch.Tensor], config: TrainConfig, dp: DPConfig,
                   lr: float | None = None) -> torch.optim.Optimizer:
    """The optimiser DP-SGD steps with: ``dp.dp_optimizer`` at ``dp.dp_lr`` (or the train lr).

    ``lr`` is this round's training rate (``models.config.round_lr``); a separate ``dp_lr``
    follows the same per-round decay.
    """
    round_lr = config.lr if lr is None else lr
    if dp.dp_lr > 0:
        round_lr = dp.dp_lr * round_lr / config.lr
    if dp.dp_optimizer == "sgd":
        return torch.optim.SGD(params, lr=round_lr, momentum=dp.dp_momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=round_lr, weight_decay=config.weight_decay)


def train_dpsgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    dp: DPConfig,
    noise_multiplier: float,
    seed: int,
    lr: float | None = None,
    noise: NoiseSource | None = None,
) -> DPTrainResult:
    """Train the model's trainable tensors in place with DP-SGD for one round.

    The model is wrapped by opacus only for the round: hooks and per-example gradients are removed
    afterwards, so the same (cached) model serves non-private rounds unchanged.

    Args:
        model: a LoRA-wrapped classifier (only adapter and head require grad).
        images: ``(N, C, S, S)`` float images in [0, 1].
        labels: ``(N,)`` int64 labels.
        config: epochs, expected batch size, learning rate, weight decay. Logit adjustment is not
            used: the class prior it needs is a statistic of the private data that the accountant
            does not cover.
        dp: clipping norm and per-example gradient engine.
        noise_multiplier: noise std over ``dp.dp_max_grad_norm`` (see
            ``privacy.accounting.noise_for_target``).
        seed: seeds dropout only (nothing that protects an example).
        lr: learning rate for this round (default ``config.lr``).
        noise: draws the Poisson batches, the gradient noise and the augmentation shifts;
            default a fresh :class:`privacy.noise.SecureNoise`.
    """
    _check_supported(config, dp)
    plan = plan_round(len(labels), config)
    noise = noise if noise is not None else SecureNoise()
    model.train()
    freeze_batchnorm(model)
    check_private_model(model)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    private_model, private_optimizer, criterion = _make_private(
        model, DataLoader(TensorDataset(images, labels), batch_size=config.batch_size),
        make_optimizer(params, config, dp, lr), dp, noise_multiplier)
    use_noise_source(private_optimizer, noise)
    try:
        total, count, steps = _private_steps(private_model, private_optimizer, criterion,
                                             params, images, labels, plan, dp, noise)
    finally:
        _unwrap(private_model, params)
        model.eval()
    logger.debug("DP-SGD round: %d steps at q=%.4f, z=%.3f", steps, plan.sample_rate,
                 noise_multiplier)
    mean = total / max(count, 1)
    if not math.isfinite(mean):
        raise FloatingPointError(f"training loss is {mean}: lower the learning rate")
    return DPTrainResult(loss=mean, noise_multiplier=noise_multiplier, plan=plan)


def _check_supported(config: TrainConfig, dp: DPConfig) -> None:
    """Refuse training settings whose effect DP-SGD would silently drop."""
    if getattr(config, "proximal_mu", 0) > 0:
        # opacus replaces each gradient by its clipped, noised per-example sum: a proximal term
        # on the parameters would be dropped silently. Say so instead.
        raise ValueError("train.proximal_mu > 0 (FedProx) is not supported with DP-SGD yet: "
                         "set proximal_mu = 0 or turn dpsgd off")
    if dp.dp_augmentations > 1 and dp.dp_grad_sample_mode == "ghost":
        raise ValueError("dp_augmentations > 1 needs per-example gradients to average over the "
                         "views: set dp_grad_sample_mode = \"einsum\" (ghost clipping never "
                         "forms them)")


def _make_private(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                  dp: DPConfig, noise_multiplier: float
                  ) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
    """opacus' wrapped model, DP optimiser (clipping at ``dp.dp_max_grad_norm``, noise
    ``noise_multiplier`` times it) and criterion (ghost clipping wraps the loss too)."""
    criterion = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        # opacus warns that secure_mode is off and about full backward hooks; both are known.
        # (Its accountant here is unused: privacy.accounting composes the events instead.)
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant=dp.dp_accountant, secure_mode=False)
        module, opacus_mode = engine_module(model, dp.dp_grad_sample_mode)
        made = engine.make_private(
            module=module, optimizer=optimizer, data_loader=loader, criterion=criterion,
            noise_multiplier=noise_multiplier, max_grad_norm=dp.dp_max_grad_norm,
            poisson_sampling=True, grad_sample_mode=opacus_mode,
        )
    # opacus' loader only sets the expected batch size; batches are drawn in _private_steps.
    if dp.dp_grad_sample_mode == "ghost":
        private_model, private_optimizer, criterion, _ = made
    else:
        private_model, private_optimizer, _ = made
    return private_model, private_optimizer, criterion


def _private_steps(private_model: nn.Module, private_optimizer: torch.optim.Optimizer,
                   criterion: nn.Module, params: list[torch.Tensor], images: torch.Tensor,
                   labels: torch.Tensor, plan: StepPlan, dp: DPConfig, noise: NoiseSource
                   ) -> tuple[float, int, int]:
    """The round's ``plan.steps`` DP-SGD steps on Poisson batches drawn from ``noise``.

    Returns:
        The summed training loss, the examples it sums over, and the steps taken.
    """
    views = max(1, dp.dp_augmentations)
    total, count, steps = 0.0, 0, 0
    view_generator = noise.generator()  # shifts protect no one (module docstring of augmult)
    private_model.train()
    freeze_batchnorm(private_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for steps in range(1, plan.steps + 1):  # noqa: B007 (returned)
            batch = poisson_batch(len(labels), plan.sample_rate, noise)
            if len(batch) == 0:
                # An empty Poisson batch (probability (1-q)^N, about e^-batch_size) is
                # skipped; the accountant is charged for every planned step anyway.
                continue
            batch_images, batch_labels = images[batch], labels[batch]
            private_optimizer.zero_grad(set_to_none=True)
            inputs, targets = batch_images, batch_labels
            if views > 1:
                inputs = shifted_views(batch_images, views, view_generator)
                targets = batch_labels.repeat_interleave(views)
            loss = criterion(private_model(inputs), targets)
            loss.backward()
            if views > 1:  # clip each example's mean over its views
                average_view_gradients(params, views)
            private_optimizer.step()
            total += loss.item() * len(batch_labels)
            count += len(batch_labels)
    return total, count, steps


def poisson_batch(num_examples: int, sample_rate: float, noise: NoiseSource) -> torch.Tensor:
    """Indices of one Poisson-sampled batch: each example independently with ``sample_rate``.
    """
    return torch.nonzero(noise.uniform(num_examples) < sample_rate).view(-1)


def use_noise_source(optimizer: torch.optim.Optimizer, noise: NoiseSource) -> None:
    """Make an opacus ``DPOptimizer`` draw its Gaussian noise from ``noise``.

    Replaces the optimiser's ``add_noise`` (opacus' own draws from a ``torch.Generator``)
    with the same computation: ``grad = clipped sum + N(0, (z C)^2)`` per parameter.

    A clipped sum that is not finite is refused (:class:`models.finite.NonFiniteError`):
    opacus clips by ``min(1, C / (norm + 1e-6))``, which for a NaN or infinite per-example
    gradient is NaN, not a bound, so that example's contribution would not be clipped.
    """
    def add_noise() -> None:
        std = optimizer.noise_multiplier * optimizer.max_grad_norm
        if not math.isfinite(std) or std < 0:
            raise NonFiniteError(f"DP-SGD noise std {std}: refused")
        for p in optimizer.params:
            _check_processed_flag(p.summed_grad)
            if not bool(torch.isfinite(p.summed_grad).all()):
                raise NonFiniteError("DP-SGD: a clipped per-example gradient sum holds NaN or "
                                     "an infinity (clipping does not bound it); refused")
            # Drawn and added in float64, rounded once (privacy.noise: no float32 gaps).
            draw = noise.gaussian(tuple(p.summed_grad.shape), std, torch.float64)
            summed = p.summed_grad.to(torch.float64) + draw.to(p.summed_grad.device)
            p.grad = summed.to(p.summed_grad.dtype).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise


def _unwrap(private_model: nn.Module, params: list[torch.Tensor]) -> None:
    """Remove opacus' hooks and per-example gradient buffers from the wrapped model."""
    close = getattr(private_model, "_close", None)
    if close is not None:
        close()
    for p in params:
        for name in ("grad_sample", "_forward_counter", "_current_grad_sample", "summed_grad"):
            if hasattr(p, name):
                delattr(p, name)
        p.grad = None
