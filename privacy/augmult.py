"""Augmentation multiplicity for DP-SGD (De et al. 2022, "Unlocking high-accuracy differentially
private image classification through scale").

Each Poisson-sampled example is seen as ``k`` randomly shifted views; the per-example gradient
that DP-SGD clips is the mean of its views' gradients. Averaging before clipping keeps the privacy
unit one example (the accountant is unchanged: one example still moves one clipped gradient) while
lowering the variance of what is clipped, so more of the clipping budget carries signal.
"""

from __future__ import annotations

import torch
from torch import nn


def shifted_views(images: torch.Tensor, views: int, generator: torch.Generator,
                  pad: int | None = None) -> torch.Tensor:
    """``views`` random translations of each image, example-major.

    Args:
        images: ``(B, C, S, S)`` images.
        views: views per image (``k``).
        generator: draws the shifts, so a replayed round sees the same views.
        pad: largest shift in pixels, each way (reflect padding fills the border); default
            1/16 of the image side, at least 1 (4 px at 64 px).

    Returns:
        ``(B * k, C, S, S)``: rows ``i * k`` to ``i * k + k - 1`` are views of image ``i``.
    """
    batch, _, height, width = images.shape
    if pad is None:
        pad = max(1, min(height, width) // 16)
    padded = nn.functional.pad(images, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (batch * views, 2), generator=generator)
    rows = offsets[:, :1] + torch.arange(height)  # (Bk, S)
    cols = offsets[:, 1:] + torch.arange(width)  # (Bk, S)
    source = torch.arange(batch).repeat_interleave(views)
    out = padded[source[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (Bk, S, S, C)
    return out.permute(0, 3, 1, 2).contiguous()


def average_view_gradients(params: list[torch.Tensor], views: int) -> None:
    """Replace opacus' per-row gradients ``(B * k, ...)`` by each example's mean ``(B, ...)``."""
    for p in params:
        sample = getattr(p, "grad_sample", None)
        if sample is None:
            continue
        p.grad_sample = sample.view(-1, views, *sample.shape[1:]).mean(dim=1)
