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

import numpy as np
import torch

from client.data.cache import DecodedCache, cache_key, file_sha256
from client.data.config import SiteDataConfig
from client.data.dicom import DecodedImage, DicomReadError, iter_decoded
from client.data.fingerprint import dataset_fingerprint
from client.data.guard import ReadLimits, guarded
from client.data.manifest import SHOW_PATH, SPLITS, Entry, ManifestInfo, read_manifest
from client.data.paths import OutsideRootError, series_files
from client.data.problems import Problem, SiteDataError
from client.data.split import assign_splits
from client.data.transforms import to_model_input, transform_settings
from client.data.volumes import volume_model_input
from models.data import ImageSet
from models.volume_transforms import volume_settings

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
        fingerprint: see :mod:`client.data.fingerprint`.
        cache_hits: images served from the decoded-image cache.
        manifest_info: the manifest's separator, encoding and skipped empty rows.
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


@dataclass
class _Decoded:
    entry: Entry
    image: np.ndarray  # (F, C, S, S)
    content_sha256: str
    file_patients: list[str]  # the files' Patient IDs


def limits_of(config: SiteDataConfig) -> ReadLimits:
    """The header bounds a site data config sets."""
    return ReadLimits(config.max_frame_bytes, config.max_pixel_bytes)


def _decode(entry: Entry, config: SiteDataConfig, image_size: int, cache: DecodedCache | None,
            roots: tuple[Path, ...]) -> tuple[_Decoded, list[str], bool]:
    """The entry's images, its SOP Instance UIDs and whether the cache served them."""
    if not entry.path.exists():
        raise DicomReadError("missing", "file not found: fix the path (relative to the "
                                        "manifest's folder) or remove the row")
    series = None
    try:
        if entry.path.is_dir():
            series = series_files(entry.path, roots)
        content = file_sha256(entry.path, series)
    except OutsideRootError as err:
        raise DicomReadError("outside", str(err)) from err
    except OSError as err:
        raise DicomReadError("unreadable", f"cannot read the file ({err})") from err
    volume = config.frames == "volume"  # one CT volume per row (client.data.volumes)
    settings = (volume_settings(image_size, None) if volume
                else transform_settings(image_size, config.frames))
    key = cache_key(content, settings)
    if cache is not None and (hit := cache.get(key)) is not None:
        return _Decoded(entry, hit[0], content, hit[2]), hit[1], True
    if volume:
        image = volume_model_input(entry.path, image_size, series)
        if cache is not None:
            cache.put(key, image, [], [])
        return _Decoded(entry, image, content, []), [], False
    images, uids, patients, shapes = [], [], [], set()
    for file in iter_decoded(entry.path, config.frames, limits_of(config), series,
                             shrink_to=image_size):
        for frame in file.frames:
            shapes.add(frame.values.shape)
            if len(shapes) > 1:
                raise DicomReadError("bad-values", f"series images differ in size "
                                     f"{sorted(shapes)}: one series folder must hold one series")
            single = DecodedImage(frame.values[None], frame.invert, frame.rgb_max, [],
                                  frame.value_range)
            images.append(to_model_input(single, image_size))
        uids.append(file.sop_uid)
        patients.append(file.patient_id)
    if not images:
        raise DicomReadError("no-pixels", "no frames to read: remove the row")
    image = np.concatenate(images)
    uids = [u for u in uids if u]
    if cache is not None:
        cache.put(key, image, uids, patients)
    return _Decoded(entry, image, content, patients), uids, False


def _read_row(entry: Entry, config: SiteDataConfig, image_size: int,
              cache: DecodedCache | None, roots: tuple[Path, ...]
              ) -> tuple[_Decoded, list[str], bool]:
    # Whatever a file makes a decoder or transform raise (Rust panics, MemoryError included)
    # costs its row, never the check or the daemon.
    return guarded("unreadable", "the file cannot be read; it is damaged or unsupported",
                   lambda: _decode(entry, config, image_size, cache, roots))


def _patient_problem(item: _Decoded) -> Problem | None:
    others = sorted({p for p in item.file_patients if p and p != item.entry.patient})
    if not others:
        return None
    shown = ", ".join(repr(p[:40]) for p in others[:3])
    return Problem(item.entry.row, item.entry.written_path[:SHOW_PATH], "patient",
                   f"the manifest says patient {item.entry.patient[:40]!r} but the file's "
                   f"Patient ID is {shown}: fix the manifest so one patient never lands in "
                   "two splits (set match_patient_id = false if the manifest uses pseudonyms)")


def _groups(decoded: list[_Decoded]) -> list[str]:
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


def _stack(images: list[np.ndarray], labels: list[int], image_size: int) -> ImageSet:
    if not images:
        return ImageSet(torch.zeros(0, 1, image_size, image_size), torch.zeros(0, dtype=torch.long))
    # Grayscale and colour in one site: grayscale goes to 3 equal channels.
    channels = max(image.shape[1] for image in images)
    arrays = [np.repeat(a, channels, axis=1) if a.shape[1] != channels else a for a in images]
    frames = [len(a) for a in arrays]
    return ImageSet(torch.from_numpy(np.concatenate(arrays)),
                    torch.tensor(np.repeat(labels, frames), dtype=torch.long))


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
    roots = config.resolved_roots(Path(manifest))
    cache = DecodedCache(config.resolved_cache_dir()) if config.use_cache else None
    decoded: list[_Decoded] = []
    seen_uids: dict[str, int] = {}
    hits = 0
    for number, entry in enumerate(entries, 1):
        try:
            item, uids, hit = _read_row(entry, config, image_size, cache, roots)
        except DicomReadError as err:
            problems.append(Problem(entry.row, entry.written_path[:SHOW_PATH], err.kind,
                                    err.reason))
            continue
        duplicate = next((seen_uids[u] for u in uids if u in seen_uids), None)
        if duplicate is not None:
            problems.append(Problem(
                entry.row, entry.written_path[:SHOW_PATH], "duplicate",
                f"same SOP Instance UID as row {duplicate}: the same image is listed twice; "
                "remove one of the rows"))
            continue
        if config.match_patient_id and (problem := _patient_problem(item)) is not None:
            problems.append(problem)
            continue
        seen_uids |= {u: entry.row for u in uids}
        hits += hit
        decoded.append(item)
        if number % 500 == 0:
            logger.info("site data: %d of %d rows read", number, len(entries))

    groups = _groups(decoded)
    splits, across_groups = assign_splits(groups, [d.entry.split for d in decoded],
                                          config.val_fraction, config.seed)
    across = sorted({d.entry.patient for d, g in zip(decoded, groups, strict=True)
                     if g in set(across_groups)})
    names = list(config.classes) or [str(i) for i in
                                     range(max((d.entry.label for d in decoded), default=-1) + 1)]
    report = SiteReport(Path(manifest), names, rows, usable_rows=len(decoded),
                        problems=sorted(problems, key=lambda p: p.row),
                        patients_across_splits=across, cache_hits=hits, manifest_info=info)
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
        sets[split] = _stack([d.image for d in chosen], [d.entry.label for d in chosen],
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
