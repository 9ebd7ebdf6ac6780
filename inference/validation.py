"""External validation: a published adapter scored on a hospital's own labelled studies.

Everything is computed here, on the hospital's machine, from the predictions ``medfed
predict`` wrote; nothing is sent anywhere. AUC, accuracy, balanced accuracy and macro-F1 are
``models.metrics.classification_metrics`` (the metrics a run reports); beside accuracy stands
the majority-class rate (what always answering the most common class would score), and
calibration: the Brier score (sklearn), the log loss (sklearn) and the expected calibration
error of the top-class confidence.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import brier_score_loss, log_loss

from imaging.problems import ManifestError
from models.metrics import classification_metrics

CALIBRATION_BINS = 10
"""Equal-width confidence bins of the expected calibration error."""


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray,
                               bins: int = CALIBRATION_BINS) -> float:
    """ECE of ``(N, K)`` probabilities against ``(N,)`` labels: over equal-width bins of the
    top-class confidence, the example-weighted mean of ``|accuracy - mean confidence|``;
    in [0, 1]."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 goes to bin 0.
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total / len(labels))


def brier_score(labels: np.ndarray, probs: np.ndarray) -> float:
    """sklearn's Brier score: binary, of the positive class's probability; multi-class, the
    mean over examples of the squared distance to the one-hot label."""
    if probs.shape[1] == 2:
        return float(brier_score_loss(labels, probs[:, 1], pos_label=1))
    return float(brier_score_loss(labels, probs, labels=list(range(probs.shape[1]))))


def external_metrics(labels: np.ndarray, probs: np.ndarray,
                     classes: list[str]) -> dict[str, object]:
    """Scores of ``(N, K)`` class probabilities against ``(N,)`` class indices.

    Returns:
        ``studies``, ``auc`` (NaN-free: None when one class only), ``accuracy``,
        ``balanced_accuracy``, ``macro_f1``, ``majority_class`` and ``majority_class_rate``,
        ``brier``, ``log_loss``, ``ece`` and ``studies_per_class`` (by class name).

    Raises:
        ManifestError: no labelled study.
    """
    if len(labels) == 0:
        raise ManifestError("no labelled study could be read: nothing to score")
    counts = np.bincount(labels, minlength=len(classes))
    scores = classification_metrics(labels, probs)
    probs = np.clip(probs, 0.0, 1.0)
    result: dict[str, object] = {
        "studies": int(len(labels)),
        **{k: (None if isinstance(v, float) and math.isnan(v) else v)
           for k, v in scores.items()},
        "majority_class": classes[int(counts.argmax())],
        "majority_class_rate": float(counts.max() / counts.sum()),
        "brier": brier_score(labels, probs),
        "log_loss": float(log_loss(labels, probs / probs.sum(axis=1, keepdims=True),
                                   labels=list(range(len(classes))))),
        "ece": expected_calibration_error(labels, probs),
        "studies_per_class": {name: int(n) for name, n in zip(classes, counts, strict=True)},
    }
    return result
