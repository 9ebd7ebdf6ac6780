"""Judging the global adapter: the hospitals' results combined, the published round, the prior.

Every round each sampled hospital scores the global adapter on its own held-out split and sends
metrics only. :func:`combine_validation` weights them by each hospital's number of examples;
:class:`AdapterSelection` keeps the round the run publishes (the best combined value of
``evaluation.select_by``, a tie going to the later round). :func:`with_prior` puts the
population's class prior back into the adapter's head bias. A coordinator-held test set is
optional: a simulation passes its held-out MedMNIST split; a deployed coordinator reads one only
when the study names ``evaluation.test_manifest`` (:func:`coordinator_test_set`, through the
reader the hospitals use), and otherwise holds no data. :func:`central_evaluator` scores the
adapter on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ArrayRecord, MetricRecord
from peft import PeftModel

from imaging.labelled_set import LabelledSetReport, read_labelled_set
from imaging.settings import ReadSettings
from models.adapters import load_adapter_state
from models.data import ImageSet
from models.metrics import RECORDED_METRIC_NAMES, evaluate

if TYPE_CHECKING:
    from server.study import Study

SELECTION_RULE = ("the global adapter of the round with the highest example-weighted "
                  "validation {metric} over the hospitals that evaluated it; a tie goes to the "
                  "later round; with no validation results at all, the last round")
"""The published adapter's rule, as ``summary.json`` states it."""


def central_evaluator(
    model: PeftModel, test_set: ImageSet
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Test loss, AUC, accuracy, balanced accuracy and macro-F1 of an adapter on a test set the
    coordinator holds (a simulation's, or the study's ``evaluation.test_manifest``).

    The model is the same LoRA model the hospitals train (BatchNorm frozen at its pretrained
    statistics on both sides), so the coordinator scores exactly what the hospitals would run.
    """

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_adapter_state(model, arrays.to_torch_state_dict())
        scores = evaluate(model, test_set.images, test_set.labels)
        return MetricRecord({f"test-{k.replace('_', '-')}": v for k, v in scores.items()})

    return evaluate_fn


def coordinator_test_set(study: Study) -> tuple[ImageSet, LabelledSetReport] | None:
    """The study's coordinator-held test set (``evaluation.test_manifest``), or None when it
    names none (then nothing is read).

    Read by :func:`imaging.labelled_set.read_labelled_set`: the manifest's labels are mapped
    to ``study.classes`` by name, each row through the hospitals' reader; the images are
    ``(N, C, image_size, image_size)`` (``(N, 1, S, S, S)`` for a 3D backbone).

    Raises:
        imaging.problems.ManifestError: the manifest cannot be read, or no row gives an image.
        ValueError: an integer label outside the study's classes (a study without class
            names).
    """
    from models.registry import backbone_spec

    manifest = study.evaluation.test_manifest
    if not manifest:
        return None
    volume = backbone_spec(study.model.backbone).spatial_dims == 3
    settings = ReadSettings(classes=tuple(study.classes), frames="volume" if volume else "middle")
    images, report = read_labelled_set(Path(manifest).expanduser(), settings,
                                       study.model.image_size)
    num_classes = study.model.num_classes
    if int(images.labels.max()) >= num_classes:
        raise ValueError(f"evaluation.test_manifest {manifest}: label "
                         f"{int(images.labels.max())} is not a class of this study "
                         f"(0..{num_classes - 1}); name the classes in the study")
    return images, report


def describe_test_set(report: LabelledSetReport) -> dict[str, Any]:
    """What ``summary.json`` says of a coordinator-held test set (``test_set``)."""
    return {"manifest": str(report.manifest), "rows": report.rows,
            "usable_rows": report.usable_rows, "images": report.images,
            "rows_left_out": len(report.problems), "fingerprint": report.fingerprint}


def combine_validation(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Hospitals' validation metrics of one round, each weighted by its ``val_examples``.

    A metric a hospital could not compute (AUC on a split holding one class: NaN) is left out
    of that metric's average, with its weight. A row whose evaluation failed is left out; one
    whose training failed but whose evaluation came back counts (separate outcomes).

    Returns:
        ``val_<metric>`` for each metric any hospital reported, ``val_examples`` (the sum) and
        ``val_auc_examples`` (the examples the combined AUC rests on: fewer than
        ``val_examples`` when a hospital's split held one class); empty when no hospital
        evaluated.
    """
    rows = [r for r in rows if r.get("val_examples") and not r.get("evaluation_error")
            and "evaluate:" not in str(r.get("error") or "")]
    if not rows:
        return {}
    combined: dict[str, float] = {"val_examples": float(sum(r["val_examples"] for r in rows))}
    for name in RECORDED_METRIC_NAMES:
        pairs = [(r["val_examples"], r[f"val_{name}"]) for r in rows
                 if isinstance(r.get(f"val_{name}"), int | float)
                 and math.isfinite(r[f"val_{name}"])]
        if pairs:
            weight = sum(w for w, _ in pairs)
            combined[f"val_{name}"] = sum(w * v for w, v in pairs) / weight
            if name == "auc":
                combined["val_auc_examples"] = float(weight)
    return combined


@dataclass
class AdapterSelection:
    """The round the run publishes, by the combined validation ``metric`` (higher is better).

    Attributes:
        metric: ``evaluation.select_by`` (``auc``, ``balanced_accuracy``...).
        best_round: the chosen round so far (0: none yet).
        best_value: its combined validation value.
    """

    metric: str
    best_round: int = 0
    best_value: float = -math.inf

    def consider(self, server_round: int, combined: dict[str, float]) -> bool:
        """Take ``server_round`` if its value is at least the best so far; True if taken."""
        value = combined.get(f"val_{self.metric}")
        if value is None or not math.isfinite(value) or value < self.best_value:
            return False
        self.best_round, self.best_value = server_round, value
        return True

    def rule(self) -> str:
        return SELECTION_RULE.format(metric=self.metric.replace("_", " "))


def head_bias_key(state: dict[str, torch.Tensor], num_classes: int) -> str:
    """The name of the classification head's bias in an adapter state.

    Raises:
        ValueError: no single trainable ``(num_classes,)`` bias outside the LoRA factors.
    """
    keys = [k for k, t in state.items() if k.endswith("bias") and "lora_" not in k
            and tuple(t.shape) == (num_classes,)]
    if len(keys) != 1:
        raise ValueError(f"cannot find the head's bias among the adapter's tensors (found "
                         f"{keys}): a prior can be put back only on a classifier head")
    return keys[0]


def with_prior(arrays: ArrayRecord, prior: list[float], num_classes: int) -> ArrayRecord:
    """``arrays`` with ``log(prior)`` added to the head bias: the class-balanced rule that
    logit-adjusted training learns, moved to a population with class shares ``prior``.
    Without a prior, ``arrays`` unchanged."""
    if not prior:
        return arrays
    state = arrays.to_torch_state_dict()
    key = head_bias_key(state, num_classes)
    state[key] = state[key] + torch.log(torch.tensor(prior, dtype=state[key].dtype))
    return ArrayRecord(state)
