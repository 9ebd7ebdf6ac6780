"""Stream studies through a published adapter in batches; write the predictions and summary.

Memory is bounded by the batch: ``batch_size`` studies are read (``imaging.rows.read_row``,
with the hospital's guards), run through the model, written to ``predictions.csv`` and
dropped; only each labelled study's class probabilities (``K`` floats) are kept, for the
external validation. The output folder holds:

- ``predictions.csv``: one row per study: ``study`` (the manifest's path text or the path under
  the input folder; never a patient's name or id), ``label`` (labelled input only),
  ``probability_<class>`` per class by name, ``predicted``, ``rule`` (the decision rule and
  prior), ``error`` (why a study could not be read; its probabilities are then empty);
- ``summary.json``: the adapter (card headline), the input, counts, device and speed;
- ``metrics.json`` (labelled input only): ``inference.validation.external_metrics``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.settings import SettingsError
from imaging.guard import DicomReadError
from imaging.rows import read_row, stack_images
from imaging.settings import ReadSettings
from inference.published import Published, adapter_summary
from inference.studies import Study, StudySource
from inference.validation import external_metrics

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.csv"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.json"
Progress = Callable[[int], None]
"""Called with the number of studies just finished (a progress bar's ``advance``)."""


def reader_settings(published: Published, allowed_roots: tuple[str, ...] = ()) -> ReadSettings:
    """The hospital reader's settings for this adapter: its classes (labels map to them by
    name) and the frames its preprocessing reads."""
    return ReadSettings(classes=tuple(published.card.classes),
                        frames=published.card.preprocessing.frames, allowed_roots=allowed_roots)


def decision_text(published: Published) -> str:
    """The decision rule and prior, as the ``rule`` column writes it."""
    prior = published.card.decision.prior
    return "argmax; prior " + (", ".join(f"{c}={p:g}" for c, p in zip(
        published.card.classes, prior, strict=True)) if prior else "equal (class-balanced)")


@dataclass
class Outcome:
    """What a prediction run produced.

    Attributes:
        studies: studies in the input.
        predicted: studies with a prediction.
        failed: studies that could not be read, by problem kind.
        per_class: predicted studies per class name.
        labels, probs: labelled studies' classes ``(N,)`` and probabilities ``(N, K)``.
        seconds: wall time of reading and predicting.
    """

    studies: int = 0
    predicted: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    per_class: Counter[str] = field(default_factory=Counter)
    labels: list[int] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0


def _batches(studies: list[Study], size: int) -> Iterator[list[Study]]:
    """Consecutive slices of at most ``size`` studies."""
    for start in range(0, len(studies), size):
        yield studies[start:start + size]


def _read(batch: list[Study], settings: ReadSettings, image_size: int, roots: tuple[Path, ...]
          ) -> tuple[list[tuple[Study, np.ndarray]], list[tuple[Study, str]]]:
    """Decode a batch: ``(study, (F, C, S, S) images)`` for each readable one, and
    ``(study, "kind: reason")`` for each other."""
    read, failed = [], []
    for study in batch:
        if study.entry is None:
            failed.append((study, study.problem))
            continue
        try:
            read.append((study, read_row(study.entry, settings, image_size, roots).image))
        except DicomReadError as err:
            failed.append((study, f"{err.kind}: {err.reason}"))
    return read, failed


@torch.no_grad()
def study_probabilities(published: Published, images: list[np.ndarray]) -> np.ndarray:
    """``(B, K)`` class probabilities of ``B`` studies' images (each ``(F, C, S, S)`` or a
    volume ``(1, 1, D, H, W)``); a study of several frames gets their mean."""
    if images[0].ndim == 5:
        batch = torch.from_numpy(np.concatenate(images))
    else:
        batch = stack_images(images, [0] * len(images), images[0].shape[-1]).images
    probs = published.model(batch.to(published.device)).double().softmax(dim=1).cpu().numpy()
    frames = np.cumsum([0, *(len(i) for i in images)])
    return np.stack([probs[a:b].mean(axis=0) for a, b in zip(frames[:-1], frames[1:],
                                                               strict=True)])


def _columns(published: Published, labelled: bool) -> list[str]:
    """The predictions CSV's header."""
    classes = published.card.classes
    return ["study", *(["label"] if labelled else []),
            *(f"probability_{c}" for c in classes), "predicted", "rule", "error"]


def _write_batch(writer: csv.DictWriter, published: Published, source: StudySource,
                 batch: list[Study], outcome: Outcome) -> None:
    """Read, predict and write one batch; record what it gave in ``outcome``."""
    classes = published.card.classes
    read, failed = _read(batch, reader_settings_for(published, source),
                         published.config.image_size, source.roots)
    probs = study_probabilities(published, [i for _, i in read]) if read else []
    rows: dict[int, dict[str, Any]] = {}
    rule = decision_text(published)
    for (study, _), p in zip(read, probs, strict=True):
        predicted = classes[int(p.argmax())]
        rows[id(study)] = {"study": study.identifier, "predicted": predicted, "rule": rule,
                           **{f"probability_{c}": f"{v:.8g}" for c, v in zip(classes, p,
                                                                          strict=True)}}
        outcome.predicted += 1
        outcome.per_class[predicted] += 1
        if study.label >= 0:
            outcome.labels.append(study.label)
            outcome.probs.append(p.astype(np.float64))
    for study, why in failed:
        rows[id(study)] = {"study": study.identifier, "error": why}
        outcome.failed[why.split(":", 1)[0]] += 1
    for study in batch:
        row = rows[id(study)]
        if source.labelled:
            row["label"] = classes[study.label] if study.label >= 0 else ""
        writer.writerow(row)
    outcome.studies += len(batch)


def reader_settings_for(published: Published, source: StudySource) -> ReadSettings:
    """:func:`reader_settings` with the source's allowed folders."""
    return reader_settings(published, tuple(str(r) for r in source.roots))


def predict_studies(published: Published, source: StudySource, out_dir: Path,
                    batch_size: int = 64, progress: Progress | None = None) -> Outcome:
    """Predict every study of ``source`` into ``out_dir/predictions.csv``, ``batch_size``
    studies at a time; ``progress(n)`` after each batch. Returns what it did (the summary
    and metrics files are :func:`write_reports`'s)."""
    if batch_size < 1:
        raise SettingsError(f"--batch-size {batch_size}: must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outcome = Outcome()
    started = time.monotonic()
    with open(out_dir / PREDICTIONS_FILE, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_columns(published, source.labelled))
        writer.writeheader()
        for batch in _batches(source.studies, batch_size):
            _write_batch(writer, published, source, batch, outcome)
            if progress is not None:
                progress(len(batch))
    outcome.seconds = time.monotonic() - started
    logger.info("%d of %d studies predicted in %.1f s (%s)", outcome.predicted, outcome.studies,
                outcome.seconds, published.device)
    return outcome


def write_reports(published: Published, source: StudySource, outcome: Outcome,
                  out_dir: Path) -> dict[str, Any]:
    """Write ``summary.json`` (and ``metrics.json`` for a labelled input); returns the
    summary, with the metrics under ``external_validation`` when there are any."""
    card = published.card
    summary: dict[str, Any] = {
        "adapter": adapter_summary(published),
        "input": source.description, "labelled": source.labelled,
        "studies": outcome.studies, "predicted": outcome.predicted,
        "failed": dict(outcome.failed), "predicted_per_class": dict(outcome.per_class),
        "rule": decision_text(published), "device": str(published.device),
        "seconds": round(outcome.seconds, 3),
        "studies_per_second": round(outcome.studies / outcome.seconds, 2)
        if outcome.seconds > 0 else None,
        "predictions": str(Path(out_dir) / PREDICTIONS_FILE),
    }
    if source.labelled and outcome.labels:
        metrics = external_metrics(np.array(outcome.labels), np.stack(outcome.probs),
                                   card.classes)
        metrics = {"adapter_sha256": summary["adapter"]["adapter_sha256"],
                   "input": source.description} | metrics
        (Path(out_dir) / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        summary["external_validation"] = metrics
    (Path(out_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
