"""A 2D U-Net trained from scratch (MONAI ``BasicUNet``): the baseline that shows what
LiteMedSAM's pretraining adds on the same slices, rounds and federation.

Slices ``(H, W)`` in [0, 1] are zero-padded at the bottom/right to :data:`GRID` (a multiple of
16, the U-Net's downsampling) and the logits cropped back; no box prompt (fully automatic).
"""

from __future__ import annotations

import math

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet

GRID = 64
FEATURES = (16, 16, 32, 64, 128, 16)
SEED = 0


def build_unet(seed: int = SEED) -> BasicUNet:
    """A seeded ``BasicUNet`` mapping ``(B, 1, 64, 64)`` slices to ``(B, 1, 64, 64)`` logits."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=FEATURES)
    finally:
        torch.random.set_rng_state(state)


def pad_slices(slices: list[torch.Tensor]) -> torch.Tensor:
    """``N`` ``(H, W)`` slices (``H, W <= 64``) -> ``(N, 1, 64, 64)`` float, zero-padded."""
    out = torch.zeros(len(slices), 1, GRID, GRID)
    for i, image in enumerate(slices):
        if max(image.shape) > GRID:
            raise ValueError(f"slice {tuple(image.shape)} exceeds the U-Net grid {GRID}")
        out[i, 0, : image.shape[0], : image.shape[1]] = image.float()
    return out


def train_unet(net: BasicUNet, images: torch.Tensor, targets: torch.Tensor, steps: int,
               batch_size: int, lr: float, seed: int) -> float:
    """Train all of ``net`` in place on ``(N, 1, 64, 64)`` images and {0, 1} targets with
    Dice + BCE (AdamW); the mean training loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    loss_fn = DiceCELoss(sigmoid=True, squared_pred=True)
    net.train()
    total, order = 0.0, torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < min(batch_size, len(images)):
            order = torch.cat([order, torch.randperm(len(images), generator=generator)])
        index, order = order[:batch_size], order[batch_size:]
        flip = torch.rand((), generator=generator) < 0.5  # left-right flip augmentation
        x, y = images[index], targets[index]
        if flip:
            x, y = x.flip(-1), y.flip(-1)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        total += loss.item()
    net.eval()
    mean = total / steps
    if not math.isfinite(mean):
        raise FloatingPointError(f"U-Net training loss is {mean}: lower the learning rate")
    return mean


def predict_unet(net: BasicUNet, slices: list[torch.Tensor]) -> list[torch.Tensor]:
    """Boolean ``(H, W)`` masks for ``(H, W)`` slices (logit > 0, padding cropped)."""
    net.eval()
    with torch.no_grad():
        logits = net(pad_slices(slices))
    return [logit[0, : s.shape[0], : s.shape[1]] > 0 for logit, s in zip(logits, slices,
                                                                         strict=True)]


def unet_targets(masks: list[torch.Tensor]) -> torch.Tensor:
    """``N`` boolean ``(H, W)`` masks -> ``(N, 1, 64, 64)`` float targets."""
    return pad_slices([m.float() for m in masks])
