"""Fixed-point encoding of adapter updates for masking, and its inverse for the sum.

A hospital's weighted update (a float vector) is clipped per coordinate to ``[-c, c]`` and
mapped onto the integers ``0 .. L`` with ``L = 2**bits - 1`` by stochastic rounding (unbiased:
the expected decoded value is the clipped input). The coordinator decodes the *sum* of ``m``
such vectors: ``sum * 2c / L - m * c``.
"""

from __future__ import annotations

import numpy as np

from models.finite import check_finite_number, check_finite_tensors


def levels(bits: int) -> int:
    """Largest quantised value, ``2**bits - 1``."""
    return (1 << bits) - 1


def quantize(values: np.ndarray, clipping_range: float, bits: int,
             rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Stochastically rounded integers for ``values`` (float, any shape -> flat uint32).

    Returns:
        ``(quantised, clipped)``: the uint32 vector and how many coordinates were clipped.

    Raises:
        models.finite.NonFiniteError: a value, or the clipping range, is NaN or infinite (a
            NaN has no integer code: cast to uint32 it would become an arbitrary one).
        ValueError: a clipping range not above 0, or ``bits`` outside 1..31.
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    check_finite_tensors({"update": flat}, "the update to mask")
    if check_finite_number(clipping_range, "the clipping range") <= 0:
        raise ValueError(f"clipping range {clipping_range!r} must be above 0")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 31:
        raise ValueError(f"quantisation bits {bits!r} must be a whole number in 1..31")
    clipped = int(np.count_nonzero(np.abs(flat) > clipping_range))
    top = levels(bits)
    scaled = (np.clip(flat, -clipping_range, clipping_range) + clipping_range) * (
        top / (2 * clipping_range))
    floor = np.floor(scaled)
    rounded = floor + (rng.random(flat.shape) < (scaled - floor))
    return np.clip(rounded, 0, top).astype(np.uint32), clipped


def dequantize_sum(total: np.ndarray, count: int, clipping_range: float, bits: int) -> np.ndarray:
    """The float sum of ``count`` hospitals' clipped inputs from the sum of their codes."""
    return total.astype(np.float64) * (2 * clipping_range / levels(bits)) - count * clipping_range


def flatten(state: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    """The tensors ``keys`` of ``state`` concatenated in that order (float64, 1-D)."""
    return np.concatenate([np.asarray(state[k], dtype=np.float64).ravel() for k in keys])


def unflatten(vector: np.ndarray, like: dict[str, np.ndarray], keys: list[str]
              ) -> dict[str, np.ndarray]:
    """Split ``vector`` back into tensors shaped and typed as ``like[k]`` for ``keys``."""
    out, start = {}, 0
    for key in keys:
        ref = like[key]
        out[key] = vector[start:start + ref.size].reshape(ref.shape).astype(ref.dtype)
        start += ref.size
    if start != vector.size:
        raise ValueError(f"vector has {vector.size} values, the tensors hold {start}")
    return out


def vector_length(like: dict[str, np.ndarray], keys: list[str]) -> int:
    """Values in the flattened ``keys`` of ``like``."""
    return sum(int(like[k].size) for k in keys)
