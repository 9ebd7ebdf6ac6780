"""Local training at a hospital: a few epochs of AdamW (or SGD) on the adapter and head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models.config import TrainConfig
from models.lora import freeze_batchnorm


def make_local_optimizer(params: list[torch.Tensor], config: TrainConfig,
                         lr: float | None = None) -> torch.optim.Optimizer:
    """The optimiser of a non-private round: ``config.optimizer`` at ``lr`` (default
    ``config.lr``)."""
    rate = config.lr if lr is None else lr
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=rate, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    if config.optimizer != "adamw":
        raise ValueError(f"train.optimizer '{config.optimizer}' is not one of adamw, sgd")
    return torch.optim.AdamW(params, lr=rate, weight_decay=config.weight_decay)


def train_local(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    seed: int,
    lr: float | None = None,
) -> float:
    """Train the model's trainable tensors in place; returns the mean training loss.

    Args:
        model: a LoRA-wrapped classifier (only adapter and head require grad).
        images: ``(N, C, S, S)`` float images in [0, 1].
        labels: ``(N,)`` int64 labels.
        config: epochs, batch size, optimiser, learning rate, weight decay, logit
            adjustment, FedProx's ``proximal_mu``.
        seed: seeds the batch order and dropout, so a round can be replayed.
        lr: learning rate for this call (default ``config.lr``), e.g. the round's decayed rate.
    """
    if len(labels) == 0:
        raise ValueError("no training examples at this hospital")
    torch.manual_seed(seed)
    loader = DataLoader(
        TensorDataset(images, labels),
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_local_optimizer(params, config, lr)
    model.train()
    freeze_batchnorm(model)
    # Logit adjustment (Menon et al. 2021; FedLC, Zhang et al. 2022): train on logits shifted by
    # the log of the local class prior, so that a skewed hospital learns the class-balanced
    # posterior instead of pulling the shared head towards its own label mix.
    shift = torch.zeros(())
    if config.logit_adjust:
        with torch.no_grad():
            num_classes = int(model(images[:1]).shape[1])
        counts = torch.bincount(labels, minlength=num_classes).float()
        shift = torch.log((counts + 1.0) / (counts.sum() + num_classes))
    # FedProx (Li et al. 2020): a proximal term keeps the local adapter near the
    # round's starting point, limiting client drift under label skew.
    anchor = [p.detach().clone() for p in params] if config.proximal_mu > 0 else []
    total, count, steps = 0.0, 0, 0
    max_steps = config.local_steps or config.local_epochs * len(loader)
    while steps < max_steps:
        for batch_images, batch_labels in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(batch_images) + shift, batch_labels)
            total += loss.item() * len(batch_labels)
            if anchor:
                loss = loss + config.proximal_mu / 2 * sum(
                    (p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True))
            loss.backward()
            optimizer.step()
            count += len(batch_labels)
            steps += 1
            if steps == max_steps:
                break
    model.eval()
    mean = total / count
    if not math.isfinite(mean):
        raise FloatingPointError(f"training loss is {mean}: lower the learning rate")
    return mean
