"""The network a run adapts: input normalisation, then a backbone that ends in a task head."""

from __future__ import annotations

import torch
from monai.networks.nets import EfficientNet
from torch import nn

from models.feature_centre import FeatureCentre
from models.prefix_cache import PrefixCache, is_fixed

DEFAULT_CACHE_BYTES = 1 << 30


class ImageClassifier(nn.Module):
    """Normalises images in [0, 1] the way the backbone was pretrained, then classifies them.

    Grayscale input is repeated to the three channels ImageNet backbones expect, so hospitals and
    simulations hand over images exactly as decoded, without knowing the backbone.

    Args:
        net: backbone + head mapping ``(B, 3, H, W)`` normalised images to ``(B, K)`` logits.
        mean: per-channel mean of the pretraining data, 3 values.
        std: per-channel standard deviation of the pretraining data, 3 values.
        channels_last: run the backbone in channels-last memory format (the backbone is
            converted here).
        cache_bytes: most bytes of frozen-prefix activations kept in memory (0: none).
        centred: subtract a fixed centre from the pooled feature before the head
            (:attr:`centre`, ``models.feature_centre``; zero until a public start sets it, so
            the logits are the uncentred ones). EfficientNet backbones only.

    For an EfficientNet whose first blocks hold no trainable tensor (LoRA on later stages only),
    those blocks are a frozen prefix: they run in inference mode (running BatchNorm statistics,
    no stochastic depth), and their output for each image is computed once and reused from
    :attr:`prefix_cache` in every later epoch, round and evaluation.
    """

    def __init__(
        self,
        net: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        channels_last: bool = False,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        centred: bool = False,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.prefix_cache = PrefixCache(cache_bytes)
        if centred and not isinstance(net, EfficientNet):
            raise ValueError("a centred head needs an EfficientNet backbone")
        self.centre = FeatureCentre(net._fc.in_features) if centred else None

    def _blocks(self) -> list[nn.Module]:
        """The backbone's blocks in forward order (none for a backbone that is not staged)."""
        if not isinstance(self.net, EfficientNet):
            return []
        return [block for stage in self.net._blocks for block in stage]

    def split_index(self) -> int:
        """Number of blocks in the frozen prefix: those before the first block that trains or
        holds an adapter tensor (0 when the stem does or the backbone is not staged)."""
        blocks = self._blocks()
        if not blocks or not is_fixed(self.net._conv_stem):
            return 0
        for index, block in enumerate(blocks):
            if not is_fixed(block):
                return index
        return len(blocks)

    def _frozen_prefix(self, split: int) -> list[nn.Module]:
        return [self.net._bn0, *self._blocks()[:split]] if split else []

    def train(self, mode: bool = True) -> ImageClassifier:
        """Train mode for the adapted part; the frozen prefix stays in inference mode."""
        super().train(mode)
        for module in self._frozen_prefix(self.split_index()):
            module.eval()
        return self

    def _normalised(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        images = (images - self.mean) / self.std
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _prefix(self, images: torch.Tensor, split: int) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(net._conv_stem_padding(self._normalised(images)))))
        for block in self._blocks()[:split]:
            x = block(x)
        return x

    def _features(self, x: torch.Tensor, split: int) -> torch.Tensor:
        """Blocks ``split`` on and the head convolution, pooled: ``(B, F)``."""
        net = self.net
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for block in self._blocks()[split:]:
            x = block(x)
        x = net._swish(net._bn1(net._conv_head(net._conv_head_padding(x))))
        return net._avg_pooling(x).flatten(start_dim=1)

    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        """The task head on the pooled feature, after the centre when there is one."""
        if self.centre is not None:
            pooled = self.centre(pooled)
        return self.net._fc(self.net._dropout(pooled))

    def _prefix_output(self, images: torch.Tensor, split: int) -> torch.Tensor:
        """The frozen prefix's activations, from the cache when its modes allow."""
        if any(m.training for part in self._frozen_prefix(split) for m in part.modules()):
            return self._prefix(images, split)  # someone trains the prefix's modes: no cache
        return self.prefix_cache.activations(images, split, lambda x: self._prefix(x, split))

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1 or 3, H, W)`` images in [0, 1] -> ``(B, F)`` pooled features (the head's
        input before :attr:`centre`). EfficientNet backbones only."""
        split = self.split_index()
        if split == 0:
            return self._features(self._prefix(images, 0), 0)
        return self._features(self._prefix_output(images, split), split)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1 or 3, H, W)`` float images in [0, 1] -> ``(B, K)`` logits."""
        split = self.split_index()
        if self.centre is not None:
            return self._head(self.pooled(images))
        if split == 0:
            return self.net(self._normalised(images))
        return self._head(self._features(self._prefix_output(images, split), split))


class HFLogits(nn.Module):
    """Makes a transformers image classifier return a plain logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits
