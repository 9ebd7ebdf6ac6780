"""Acquisition shift: each simulated hospital's images look as if taken on its own scanner.

A hospital draws a seeded *scanner profile* (contrast gamma, intensity gain and offset, blur,
noise) and MONAI transforms apply it to that hospital's train and validation images. The
coordinator's test set stays as acquired, so the report shows how well the shared model copes
with the spread of scanners. Same seed and hospital, same profile and same noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import AdjustContrast, GaussianSmooth, RandGaussianNoise
from monai.utils import convert_to_tensor

from models.data import ImageSet

SHIFTS = ("none", "scanners")


@dataclass(frozen=True)
class ScannerProfile:
    """How one hospital's scanner renders intensities in [0, 1].

    Attributes:
        gamma: contrast curve exponent (1: unchanged; > 1 darker mid-tones).
        gain: intensity multiplier (1: unchanged).
        offset: added intensity, in units of the full [0, 1] range.
        blur_sigma: Gaussian blur standard deviation, in pixels (0: sharp).
        noise_std: additive Gaussian noise standard deviation, in intensity units.
    """

    gamma: float = 1.0
    gain: float = 1.0
    offset: float = 0.0
    blur_sigma: float = 0.0
    noise_std: float = 0.0


def scanner_profile(hospital: int, seed: int, strength: float = 1.0) -> ScannerProfile:
    """Hospital ``hospital``'s scanner, drawn from ``(seed, hospital)``; ``strength`` scales
    every departure from a neutral scanner (0: no shift, 1: typical, 2: severe)."""
    if strength < 0:
        raise ValueError(f"shift strength must be >= 0, got {strength}")
    rng = np.random.default_rng([seed, hospital, 0x5CA7])
    u = rng.uniform(-1.0, 1.0, 3)
    return ScannerProfile(
        gamma=float(np.exp(0.4 * strength * u[0])),
        gain=float(1.0 + 0.2 * strength * u[1]),
        offset=float(0.08 * strength * u[2]),
        blur_sigma=float(1.0 * strength * rng.uniform()),
        noise_std=float(0.04 * strength * rng.uniform()),
    )


def apply_profile(images: torch.Tensor, profile: ScannerProfile, seed: int) -> torch.Tensor:
    """``(N, C, S, S)`` images in [0, 1] as ``profile``'s scanner renders them (same shape, in
    [0, 1]); the noise is drawn from ``seed``."""
    n, c, h, w = images.shape
    # One (N*C, H, W) stack: MONAI's 2D transforms treat the first axis as channels, each
    # filtered on its own, so the whole set goes through in one call.
    x = images.reshape(n * c, h, w).float()
    if profile.gamma != 1.0:
        x = AdjustContrast(gamma=profile.gamma)(x)
    if profile.gain != 1.0 or profile.offset != 0.0:
        x = x * profile.gain + profile.offset
    if profile.blur_sigma > 0:
        # MONAI's Gaussian filter pads with zeros, which would darken the border like a
        # vignette; pad by replicating edge pixels instead (kernel reach: 4 sigma) and crop.
        r = int(4 * profile.blur_sigma) + 1
        padded = F.pad(torch.as_tensor(x)[None], (r, r, r, r), mode="replicate")[0]
        x = GaussianSmooth(sigma=profile.blur_sigma)(padded)[:, r:-r, r:-r]
    if profile.noise_std > 0:
        # Fixed std (not drawn up to std), so the profile says exactly what is added.
        noise = RandGaussianNoise(prob=1.0, mean=0.0, std=profile.noise_std, sample_std=False)
        noise.set_random_state(seed=seed % (2**32))
        x = noise(x)
    # Plain tensors out (MONAI returns MetaTensors), as the rest of medfed holds images.
    x = convert_to_tensor(x, track_meta=False).clamp(0.0, 1.0)
    return x.reshape(n, c, h, w).contiguous()


def shift_site(images: ImageSet, shift: str, hospital: int, seed: int,
               strength: float = 1.0) -> ImageSet:
    """One hospital's images under ``shift`` (``none`` or ``scanners``)."""
    if shift in ("", "none"):
        return images
    if shift != "scanners":
        raise ValueError(f"unknown acquisition shift '{shift}': use one of {', '.join(SHIFTS)}")
    profile = scanner_profile(hospital, seed, strength)
    shifted = apply_profile(images.images, profile, seed * 1_000_003 + hospital)
    return ImageSet(images=shifted, labels=images.labels)
