"""Image sets as both sides hold them in memory: float images in [0, 1] with integer labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class ImageSet:
    """Images and labels of one split.

    Attributes:
        images: ``(N, C, S, S)`` float32 in [0, 1], C = 1 (grayscale) or 3 (RGB); or volumes
            ``(N, 1, H, W, D)`` for a 3D backbone.
        labels: ``(N,)`` int64 class indices.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.ndim not in (4, 5) or len(self.images) != len(self.labels):
            raise ValueError(
                f"images {tuple(self.images.shape)} and labels {tuple(self.labels.shape)} "
                "must be (N, C, S, S) (or volumes (N, 1, H, W, D)) and (N,)"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> ImageSet:
        """The examples at ``indices``, in that order."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index])

    @staticmethod
    def concat(sets: list[ImageSet]) -> ImageSet:
        return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]))


def to_image_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, H, W, 3)`` -> float32 ``(N, C, size, size)`` in [0, 1].

    Bilinear with antialiasing, on the whole array at once.
    """
    if images.ndim not in (3, 4):
        raise ValueError(f"expected 2D images (N, H, W[, 3]), got shape {images.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    tensor = tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    if tensor.shape[-1] != size or tensor.shape[-2] != size:
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True)
    return tensor.clamp_(0.0, 1.0).contiguous()


def to_volume_tensor(volumes: np.ndarray, size: int) -> torch.Tensor:
    """uint8 ``(N, H, W, D)`` volumes -> float32 ``(N, 1, size, size, size)`` in [0, 1].

    Trilinear, on the whole array at once (MedMNIST 3D volumes are already isotropic cubes).
    """
    if volumes.ndim != 4:
        raise ValueError(f"expected volumes (N, H, W, D), got shape {volumes.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(volumes)).float().div_(255.0).unsqueeze(1)
    if tuple(tensor.shape[2:]) != (size, size, size):
        tensor = F.interpolate(tensor, size=(size, size, size), mode="trilinear",
                               align_corners=False)
    return tensor.clamp_(0.0, 1.0).contiguous()


def middle_slices(volumes: np.ndarray) -> np.ndarray:
    """uint8 ``(N, H, W, D)`` volumes -> ``(N, S, S, 3)``: the three orthogonal middle slices
    as the channels of one image (what a 2D backbone sees of a volume; cubes only)."""
    n, h, w, d = volumes.shape
    if not h == w == d:
        raise ValueError(f"middle slices need cubic volumes, got {volumes.shape[1:]}")
    return np.stack([volumes[:, h // 2], volumes[:, :, w // 2], volumes[:, :, :, d // 2]], -1)
