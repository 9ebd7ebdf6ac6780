"""Statistics of a model's test scores: ROC AUC, its bootstrap interval, calibration."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score

BOOTSTRAP_RESAMPLES = 1000
CALIBRATION_BINS = 10


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC of ``(N, K)`` class probabilities (binary: the positive class; multi-class:
    one-vs-rest macro); NaN when ``labels`` hold one class."""
    if len(np.unique(labels)) < 2:
        return math.nan
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    return float(roc_auc_score(labels, probs, multi_class="ovr", labels=range(probs.shape[1])))


def bootstrap_auc_ci(labels: np.ndarray, probs: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC: resample test examples with replacement.

    Resamples holding a single class (AUC undefined) are skipped.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        value = roc_auc(labels[idx], probs[idx])
        if math.isfinite(value):
            values.append(value)
    if not values:
        return (math.nan, math.nan)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def calibration_bins(labels: np.ndarray, probs: np.ndarray, bins: int = CALIBRATION_BINS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-class confidence vs accuracy in ``bins`` equal-width bins over [0, 1].

    Returns ``(mean confidence, accuracy, count)`` per bin (NaN where a bin is empty).
    """
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    which = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, confidence, bins) / count
        accuracy = np.bincount(which, correct, bins) / count
    return mean_conf, accuracy, count


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray,
                               bins: int = CALIBRATION_BINS) -> float:
    """ECE: the example-weighted mean gap between confidence and accuracy over bins."""
    mean_conf, accuracy, count = calibration_bins(labels, probs, bins)
    used = count > 0
    return float(np.sum(count[used] * np.abs(accuracy[used] - mean_conf[used])) / count.sum())
