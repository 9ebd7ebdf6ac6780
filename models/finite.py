"""Finite or refused: the check every tensor and number a hospital uses or releases passes.

A single NaN or infinity in a tensor the coordinator sends survives training untouched (a head
row of a class the hospital has no example of never moves), makes the update's norm NaN, and
``min(1, C / nan)`` is then "no clipping". So a non-finite value is never computed with: it is
refused where it arrives and again before anything leaves. The error names the tensors and
counts only (adapter tensor names are the run's, never a patient's).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from core.errors import MedfedError


class NonFiniteError(MedfedError, ValueError):
    """A tensor or number that must be finite holds NaN or an infinity; nothing is released."""


def non_finite_count(values: torch.Tensor | np.ndarray) -> int:
    """How many entries of ``values`` (any shape; integer dtypes are always finite) are NaN
    or infinite."""
    if isinstance(values, torch.Tensor):
        if not (values.is_floating_point() or values.is_complex()):
            return 0
        return int(values.numel() - torch.isfinite(values).sum().item())
    array = np.asarray(values)
    if not np.issubdtype(array.dtype, np.inexact):
        return 0
    return int(array.size - np.isfinite(array).sum())


def check_finite_tensors(state: Mapping[str, torch.Tensor | np.ndarray], what: str) -> None:
    """Raise :class:`NonFiniteError` if any tensor of ``state`` (name -> tensor) is not finite.

    Args:
        state: named tensors (torch or NumPy, any shapes).
        what: what they are, for the message (``"the coordinator's adapter"``).
    """
    bad = {name: count for name, tensor in state.items()
           if (count := non_finite_count(tensor))}
    if bad:
        names = sorted(bad)
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise NonFiniteError(f"{what} holds {sum(bad.values())} non-finite values (NaN or "
                             f"infinity) in {len(bad)} tensors ({shown}); refused")


def check_finite_number(value: float, what: str) -> float:
    """``value`` as a float if it is finite, else :class:`NonFiniteError` naming ``what``."""
    number = float(value)
    if not math.isfinite(number):
        raise NonFiniteError(f"{what} is {number}: not a finite number; refused")
    return number
