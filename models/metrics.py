"""Classification metrics, computed one way for hospitals, the coordinator and the baselines.

Names used everywhere (logs, metrics.csv, summary.json): ``loss``, ``auc``, ``accuracy``,
``balanced_accuracy``, ``macro_f1``. AUC is ROC AUC (binary: of the positive class; multi-class:
one-vs-rest, averaged over the classes the labels hold: a hospital whose validation split lacks
a class still scores the others, so its AUC stays defined whenever two classes are present;
with every class present this is sklearn's macro one-vs-rest AUC). Balanced accuracy is the
mean recall over the classes present in the labels; beside accuracy it shows whether a rule
beats always answering the most common class.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from torch import nn

METRIC_NAMES = ("loss", "auc", "accuracy", "balanced_accuracy", "macro_f1")
"""What :func:`evaluate` returns, in the order reports show them."""
SEGMENTATION_METRIC_NAMES = ("dice", "hd95", "dice_whole", "hd95_whole")
"""What a hospital reports for a segmentation adapter (``client.segmentation``): the mean over
its validation cases of 3D Dice and 95 % Hausdorff distance (millimetres, lower is better)
with tight box prompts, and the same with the whole slice as the box (automatic mode)."""
RECORDED_METRIC_NAMES = METRIC_NAMES + SEGMENTATION_METRIC_NAMES
"""Every metric the run records (``metrics.csv``, ``summary.json``, the card); a task fills
its own and leaves the others empty."""


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC, accuracy, balanced accuracy and macro-F1 of ``(N, K)`` class probabilities against
    ``(N,)`` labels.

    AUC is NaN when the labels hold a single class (it is undefined there); see the module
    docstring for multi-class AUC.
    """
    predicted = probs.argmax(axis=1)
    num_classes = probs.shape[1]
    if len(np.unique(labels)) < 2:
        auc = math.nan
    elif num_classes == 2:
        auc = float(roc_auc_score(labels, probs[:, 1]))
    else:
        auc = float(np.mean(list(one_vs_rest_auc(labels, probs).values())))
    return {
        "auc": auc,
        "accuracy": float(accuracy_score(labels, predicted)),
        "balanced_accuracy": balanced_accuracy(labels, predicted),
        "macro_f1": float(
            f1_score(labels, predicted, average="macro", labels=range(num_classes), zero_division=0)
        ),
    }


def one_vs_rest_auc(labels: np.ndarray, probs: np.ndarray) -> dict[int, float]:
    """ROC AUC of each class against the rest, for every class that ``labels`` hold alongside
    at least one other (class -> AUC); ``(N,)`` labels, ``(N, K)`` probabilities. Classes the
    labels lack are left out, so sklearn never warns of an undefined score."""
    present = np.unique(labels)
    if len(present) < 2:
        return {}
    return {int(c): float(roc_auc_score(labels == c, probs[:, c])) for c in present}


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean recall over the classes present in ``labels`` (sklearn's definition, without its
    warning for a split that holds one class); NaN for no labels."""
    present = np.unique(labels)
    if not len(present):
        return math.nan
    return float(np.mean([(predicted[labels == c] == c).mean() for c in present]))


def decision_summary(labels: np.ndarray, predicted: np.ndarray,
                     num_classes: int) -> dict[str, list[float] | float]:
    """How a decision rule splits a labelled set: each class's share of the labels
    (``class_shares``), the commonest class's share (``majority_rate``: the accuracy of always
    answering it), each class's recall (``recall_per_class``, NaN for a class absent from
    ``labels``) and each class's share of the predictions (``predicted_shares``).

    Args:
        labels: ``(N,)`` true classes.
        predicted: ``(N,)`` predicted classes.
        num_classes: ``K``; each list has ``K`` entries.
    """
    shares = np.bincount(labels, minlength=num_classes) / max(len(labels), 1)
    answered = np.bincount(predicted, minlength=num_classes) / max(len(predicted), 1)
    recall = [float((predicted[labels == c] == c).mean()) if (labels == c).any() else math.nan
              for c in range(num_classes)]
    return {"class_shares": shares.tolist(), "majority_rate": float(shares.max()),
            "recall_per_class": recall, "predicted_shares": answered.tolist()}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``(N, K)`` logits of ``(N, C, S, S)`` images, in eval mode, in batches."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(images[i : i + batch_size])
                          for i in range(0, len(images), batch_size)])
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean cross-entropy ``loss`` plus :func:`classification_metrics` on one image set."""
    logits = predict(model, images)
    loss = float(F.cross_entropy(logits, labels))
    probs = logits.softmax(dim=1).numpy()
    return {"loss": loss, **classification_metrics(labels.numpy(), probs)}
