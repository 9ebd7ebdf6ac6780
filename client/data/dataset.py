"""Manifest + DICOM files -> a checked, fingerprinted train/validation dataset for one hospital.

:func:`prepare_site` reads every row once (through the decoded-image cache), records each
problem with its row, drops duplicates, splits per patient and returns the images with a
:class:`SiteReport`. ``medfed hospital check`` prints that report; the hospital's ClientApp
trains on what it returns and tells the coordinator only :meth:`SiteReport.shareable`.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from client.data.cache import DecodedCache
from client.data.config import SiteDataConfig
from client.data.problems import Problem, SiteDataError
from client.data.split import assign_splits
from imaging.dicom import DicomReadError
from imaging.fingerprint import dataset_fingerprint
from imaging.manifest import SHOW_PATH, SPLITS, ManifestInfo, read_manifest
from imaging.rows import DecodedRow, read_row, stack_images
from models.data import ImageSet

logger = logging.getLogger(__name__)


@dataclass
class SiteReport:
    """What the check found. Stays in the hospital except :meth:`shareable`.

    Attributes:
        manifest: the manifest file.
        classes: class names (or indices as text when no class list is set).
        rows: data rows in the manifest.
        usable_rows: rows that gave at least one image.
        images: ``{split: {class name: images}}``.
        patients: ``{split: patients}``.
        images_per_patient: ``{split: (min, median, max)}``.
        problems: unusable rows with their reasons, in manifest order.
        patients_across_splits: patients the manifest put in both splits (all moved to train).
        fingerprint: see :mod:`imaging.fingerprint`.
        cache_hits: images served from the decoded-image cache.
        manifest_info: the manifest's separator, encoding and skipped empty rows.
        warnings: usable rows whose reading gave warnings (pydicom's, e.g. a malformed UID),
            one :class:`Problem` of kind ``warning`` each, in manifest order; they are used.
    """

    manifest: Path
    classes: list[str]
    rows: int
    usable_rows: int = 0
    images: dict[str, dict[str, int]] = field(default_factory=dict)
    patients: dict[str, int] = field(default_factory=dict)
    images_per_patient: dict[str, tuple[int, float, int]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    patients_across_splits: list[str] = field(default_factory=list)
    fingerprint: str = ""
    cache_hits: int = 0
    manifest_info: ManifestInfo | None = None
    warnings: list[Problem] = field(default_factory=list)

    @property
    def error_fraction(self) -> float:
        """Share of manifest rows that are unusable."""
        return (self.rows - self.usable_rows) / self.rows if self.rows else 1.0

    def split_images(self, split: str) -> int:
        return sum(self.images.get(split, {}).values())

    def failures(self, max_error_fraction: float) -> list[str]:
        """Why this data must not be trained on; empty when it may."""
        reasons = []
        if self.usable_rows == 0:
            reasons.append("no usable images remain")
        elif self.split_images("train") == 0:
            reasons.append("no training images remain (every usable patient is in 'val')")
        if self.error_fraction > max_error_fraction:
            reasons.append(f"{self.rows - self.usable_rows} of {self.rows} rows "
                           f"({self.error_fraction:.1%}) are unusable, above the allowed "
                           f"{max_error_fraction:.1%} (max_error_fraction)")
        return reasons

    def shareable(self) -> dict[str, int | str]:
        """What may leave the hospital: the fingerprint and counts, no ids, UIDs or paths."""
        info: dict[str, int | str] = {"fingerprint": self.fingerprint, "rows": self.rows,
                                      "usable-rows": self.usable_rows}
        for split in SPLITS:
            info[f"{split}-images"] = self.split_images(split)
            info[f"{split}-patients"] = self.patients.get(split, 0)
        return info


def _patient_problem(item: DecodedRow) -> Problem | None:
    others = sorted({p for p in item.file_patients if p and p != item.entry.patient})
    if not others:
        return None
    shown = ", ".join(repr(p[:40]) for p in others[:3])
    return Problem(item.entry.row, item.entry.written_path[:SHOW_PATH], "patient",
                   f"the manifest says patient {item.entry.patient[:40]!r} but the file's "
                   f"Patient ID is {shown}: fix the manifest so one patient never lands in "
                   "two splits (set match_patient_id = false if the manifest uses pseudonyms)")


def _warning(item: DecodedRow) -> Problem:
    """A usable row's reading warnings as a report line (kind ``warning``)."""
    return Problem(item.entry.row, item.entry.written_path[:SHOW_PATH], "warning",
                   "used, but reading it warned: " + "; ".join(item.notes[:3])
                   + (f" (and {len(item.notes) - 3} more)" if len(item.notes) > 3 else ""))


def _groups(decoded: list[DecodedRow]) -> list[str]:
    """A split group per row: manifest patients linked through the files' Patient IDs, so two
    manifest ids for one patient still land in one split."""
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for item in decoded:
        for file_patient in item.file_patients:
            if file_patient:
                a, b = find("m:" + item.entry.patient), find("f:" + file_patient)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    return [find("m:" + d.entry.patient) for d in decoded]


def _decode_rows(entries: list, config: SiteDataConfig, image_size: int, manifest: Path,
                 problems: list[Problem]) -> tuple[list[DecodedRow], int]:
    """Each manifest entry read through the guards (or the decoded cache); an unreadable
    row, an image listed twice or a patient-id mismatch is added to ``problems`` and left out.
    Returns the decoded rows and how many came from the cache."""
    roots = config.resolved_roots(manifest)
    cache = DecodedCache(config.resolved_cache_dir()) if config.use_cache else None
    decoded: list[DecodedRow] = []
    seen_uids: dict[str, int] = {}
    hits = 0
    for number, entry in enumerate(entries, 1):
        try:
            item = read_row(entry, config, image_size, roots, cache)
        except DicomReadError as err:
            problems.append(Problem(entry.row, entry.written_path[:SHOW_PATH], err.kind,
                                    err.reason))
            continue
        duplicate = next((seen_uids[u] for u in item.uids if u in seen_uids), None)
        if duplicate is not None:
            problems.append(Problem(
                entry.row, entry.written_path[:SHOW_PATH], "duplicate",
                f"same SOP Instance UID as row {duplicate}: the same image is listed twice; "
                "remove one of the rows"))
            continue
        if config.match_patient_id and (problem := _patient_problem(item)) is not None:
            problems.append(problem)
            continue
        seen_uids |= {u: entry.row for u in item.uids}
        hits += item.cached
        decoded.append(item)
        if number % 500 == 0:
            logger.info("site data: %d of %d rows read", number, len(entries))
    return decoded, hits


def prepare_site(manifest: Path, config: SiteDataConfig,
                 image_size: int) -> tuple[dict[str, ImageSet], SiteReport]:
    """Read, check and split a hospital's data.

    Args:
        manifest: the CSV manifest.
        config: column names, class list, frames, split and cache settings.
        image_size: side in pixels of the images the model takes.

    Returns:
        ``{"train": ImageSet, "val": ImageSet}`` (images ``(N, C, S, S)`` float32 in [0, 1]) and
        the report. Never raises for a bad row, only for a bad manifest.

    Raises:
        ManifestError: the manifest is missing, empty or lacks a column.
    """
    entries, problems, rows, info = read_manifest(Path(manifest), config)
    decoded, hits = _decode_rows(entries, config, image_size, Path(manifest), problems)
    groups = _groups(decoded)
    splits, across_groups = assign_splits(groups, [d.entry.split for d in decoded],
                                          config.val_fraction, config.seed)
    across = sorted({d.entry.patient for d, g in zip(decoded, groups, strict=True)
                     if g in set(across_groups)})
    names = list(config.classes) or [str(i) for i in
                                     range(max((d.entry.label for d in decoded), default=-1) + 1)]
    report = SiteReport(Path(manifest), names, rows, usable_rows=len(decoded),
                        problems=sorted(problems, key=lambda p: p.row),
                        patients_across_splits=across, cache_hits=hits, manifest_info=info,
                        warnings=[_warning(d) for d in decoded if d.notes])
    sets = {}
    for split in SPLITS:
        chosen = [d for d, s in zip(decoded, splits, strict=True) if s == split]
        images: Counter[str] = Counter()
        per_patient: Counter[str] = Counter()
        for d in chosen:
            images[names[d.entry.label]] += len(d.image)
            per_patient[d.entry.patient] += len(d.image)
        report.images[split] = {name: images.get(name, 0) for name in names}
        report.patients[split] = len(per_patient)
        if per_patient:
            counts = list(per_patient.values())
            report.images_per_patient[split] = (min(counts), statistics.median(counts),
                                                max(counts))
        sets[split] = stack_images([d.image for d in chosen], [d.entry.label for d in chosen],
                             image_size)
    report.fingerprint = dataset_fingerprint(
        config.classes, ((d.entry.written_path, d.entry.label, d.entry.patient, s,
                          d.content_sha256) for d, s in zip(decoded, splits, strict=True)),
        config.frames)
    return sets, report


def load_manifest_site(manifest: Path, config: SiteDataConfig,
                       image_size: int) -> tuple[dict[str, ImageSet], SiteReport]:
    """:func:`prepare_site`, refusing data the check fails (see :meth:`SiteReport.failures`).

    Raises:
        ManifestError: the manifest is missing, empty or lacks a column.
        SiteDataError: nothing usable, or more unusable rows than ``max_error_fraction``; the
            message names the first problems and says to run ``medfed hospital check``.
    """
    sets, report = prepare_site(manifest, config, image_size)
    failures = report.failures(config.max_error_fraction)
    if failures:
        first = "; ".join(str(p) for p in report.problems[:3])
        raise SiteDataError(
            f"{manifest}: {' and '.join(failures)}. First problems: {first or 'none'}. "
            f"Run 'medfed hospital check --manifest {manifest}' for the full list.")
    if report.problems:
        logger.warning("site data %s: %d of %d rows left out (run 'medfed hospital check' for "
                       "the list)", manifest, report.rows - report.usable_rows, report.rows)
    return sets, report
