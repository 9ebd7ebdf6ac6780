"""Where a hospital's differential-privacy randomness comes from.

Every draw that a DP guarantee rests on (DP-SGD's Gaussian noise, its Poisson sampling, the noise
on a released update) comes from :class:`SecureNoise`: a ChaCha20 keystream (``cryptography``)
keyed with 32 bytes of ``os.urandom`` at the hospital, never derived from anything the
coordinator knows and never sent anywhere. A fresh key per :class:`SecureNoise` object, i.e.
per round.

Why not a seeded ``torch.Generator``: the CPU generator is an MT19937 whose ``manual_seed``
keeps only the low 32 bits of the seed (``manual_seed(2**32 + 5)`` draws what ``manual_seed(5)``
draws), so an attacker holding a released update can try every seed; MT19937 is also not a
cryptographic generator. Why not opacus' ``secure_mode``: it needs ``torchcsprng``, whose last
release (0.2.1, 2021) was built for torch 1.8; pip finds no distribution of it for this
environment.

Gaussians are drawn with the Box-Muller transform in float64 from 53-bit uniforms and rounded
to the released tensor's dtype (float32 for adapters) after being added, so the float32 values a
release can take have no gaps at float32 resolution: the floating-point attacks on Gaussian
noise (Jin et al. 2022) exploit gaps in the set of values the noise can take at the release
precision. opacus' ``secure_mode`` instead sums four float32 draws (Holohan and Braghin 2021),
which costs several times one float64 draw (figures: docs/privacy.md).

:class:`ReplayableNoise` draws the same distributions from a seeded generator so that a
simulated study replays exactly; it is insecure by design and exists only behind the setting
``insecure_replayable_noise`` of a simulation (a hospital daemon refuses it).
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

INSECURE_NOISE_KEY = "insecure-replayable-noise"
"""Node-config key (simulations only) that makes a hospital draw its DP noise from the run's
seed; a hospital daemon's node config never carries it (``client.site_folder``)."""


class NoiseSource(Protocol):
    """The randomness of one round's DP mechanisms at one hospital."""

    def gaussian(self, shape: tuple[int, ...], std: float,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``N(0, std^2)`` samples of ``shape``."""

    def uniform(self, count: int) -> torch.Tensor:
        """``count`` float64 samples uniform in (0, 1)."""

    def generator(self) -> torch.Generator:
        """A torch generator for randomness that protects no one (augmentation shifts)."""


class SecureNoise:
    """A CSPRNG (ChaCha20 keyed from ``os.urandom``) at the hospital; see the module docstring."""

    def __init__(self) -> None:
        self._key = os.urandom(32)
        self._counter = 0

    def _bytes(self, count: int) -> bytes:
        # A fresh 16-byte nonce (64-bit block counter + 64-bit stream number) per request, so
        # no keystream is ever reused.
        nonce = (0).to_bytes(8, "little") + self._counter.to_bytes(8, "little")
        self._counter += 1
        encryptor = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
        return encryptor.update(bytes(count))

    def uniform(self, count: int) -> torch.Tensor:
        words = np.frombuffer(self._bytes(8 * count), dtype=np.uint64)
        # 53 random bits, shifted half a step off zero: values in (0, 1), never 0 or 1.
        values = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
        return torch.from_numpy(values)

    def gaussian(self, shape: tuple[int, ...], std: float,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        count = math.prod(shape)
        if std == 0 or count == 0:
            return torch.zeros(shape, dtype=dtype)
        # Box-Muller: each pair of uniforms gives two independent normals.
        pairs = (count + 1) // 2
        u = self.uniform(2 * pairs).view(2, pairs)
        radius = torch.sqrt(-2.0 * torch.log(u[0]))
        angle = 2.0 * math.pi * u[1]
        normals = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]
        return (normals * std).view(shape).to(dtype)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


class ReplayableNoise:
    """Seeded draws, so a simulated round replays: INSECURE, simulations only.

    Anyone who knows the seed (the coordinator chose it) can subtract the noise.
    """

    def __init__(self, seed: int) -> None:
        self._torch = torch.Generator().manual_seed(seed)
        self._seed = seed

    def uniform(self, count: int) -> torch.Tensor:
        return torch.rand(count, generator=self._torch, dtype=torch.float64)

    def gaussian(self, shape: tuple[int, ...], std: float,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        noise = torch.randn(shape, generator=self._torch, dtype=torch.float64) * std
        return noise.to(dtype)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self._seed + 2)


def noise_source(insecure_replayable: bool, seed: int) -> NoiseSource:
    """The round's noise: :class:`SecureNoise`, or :class:`ReplayableNoise` from ``seed`` when
    the simulation set ``insecure_replayable_noise``."""
    return ReplayableNoise(seed) if insecure_replayable else SecureNoise()
