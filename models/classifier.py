"""The network a run adapts: input normalisation, then a backbone that ends in a task head."""

from __future__ import annotations

import torch
from torch import nn


class ImageClassifier(nn.Module):
    """Normalises images in [0, 1] the way the backbone was pretrained, then classifies them.

    Grayscale input is repeated to the three channels ImageNet backbones expect, so hospitals and
    simulations hand over images exactly as decoded, without knowing the backbone.

    Args:
        net: backbone + head mapping ``(B, 3, H, W)`` normalised images to ``(B, K)`` logits.
        mean: per-channel mean of the pretraining data, 3 values.
        std: per-channel standard deviation of the pretraining data, 3 values.
        channels_last: run the backbone in channels-last memory format (about 1.5x faster for
            convolutional nets on CPU; the backbone is converted here).
    """

    def __init__(
        self,
        net: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1 or 3, H, W)`` float images in [0, 1] -> ``(B, K)`` logits."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        images = (images - self.mean) / self.std
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)


class HFLogits(nn.Module):
    """Makes a transformers image classifier return a plain logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits
