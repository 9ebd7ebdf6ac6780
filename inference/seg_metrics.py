"""External validation of a segmentation adapter: 3D Dice and 95 % Hausdorff distance per study.

MONAI's metrics (``compute_dice``, ``compute_hausdorff_distance`` with the voxel spacing, so the
distance is in millimetres) on the whole predicted volume against the hospital's true mask,
computed on the hospital's machine; nothing is sent anywhere. A value that is not defined (a
true mask without the structure: Dice; an empty prediction or truth: the distance) is None,
and means are over the studies where it is defined.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

HD_PERCENTILE = 95


def dice_and_hd95(predicted: np.ndarray, truth: np.ndarray,
                  spacing_mm: np.ndarray) -> tuple[float | None, float | None]:
    """Dice in [0, 1] and the 95th-percentile symmetric Hausdorff distance in millimetres of
    two boolean 3D masks of one shape ``(X, Y, Z)`` with voxel size ``spacing_mm`` ``(3,)``."""
    if predicted.shape != truth.shape:
        raise ValueError(f"prediction {predicted.shape} and truth {truth.shape} differ in shape")
    pred = torch.from_numpy(np.ascontiguousarray(predicted, dtype=np.float32))[None, None]
    true = torch.from_numpy(np.ascontiguousarray(truth, dtype=np.float32))[None, None]
    with warnings.catch_warnings():
        # MONAI warns on empty masks (the None case below) and on its own deprecated argument.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        dice = float(compute_dice(pred, true, include_background=True).item())
        hd95 = float(compute_hausdorff_distance(
            pred, true, include_background=True, percentile=HD_PERCENTILE,
            spacing=[float(s) for s in spacing_mm]).item()) if pred.any() and true.any() \
            else math.nan
    return (dice if math.isfinite(dice) else None, hd95 if math.isfinite(hd95) else None)


def mean_of(values: list[float | None]) -> float | None:
    """Mean of the defined values (None when none is)."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None
