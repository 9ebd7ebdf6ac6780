"""A whole manifest as one labelled image set: a coordinator's held-out test set.

Every row is read through :func:`imaging.rows.read_row` (the path a hospital's rows take, with
the same guards against hostile files); a row that cannot be used is left out and named in the
report, a file listed twice (same SOP Instance UID) counts once. There is no split and no cache:
the whole manifest is the set.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from imaging.dicom import DicomReadError
from imaging.fingerprint import dataset_fingerprint
from imaging.manifest import SHOW_PATH, read_manifest
from imaging.problems import ManifestError, Problem, summarise
from imaging.rows import DecodedRow, read_row, stack_images
from imaging.settings import ReadSettings
from models.data import ImageSet

logger = logging.getLogger(__name__)


@dataclass
class LabelledSetReport:
    """What reading the set found.

    Attributes:
        manifest: the manifest file.
        rows: data rows in the manifest.
        usable_rows: rows that gave at least one image.
        images: images per class name (class indices as text without a class list).
        problems: the rows left out, with their reasons, in manifest order.
        fingerprint: sha256 over the class list, the frames setting and every usable row's
            path, label, patient and file bytes (``imaging.fingerprint``).
    """

    manifest: Path
    rows: int
    usable_rows: int = 0
    images: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    fingerprint: str = ""


def read_labelled_set(manifest: Path, settings: ReadSettings,
                      image_size: int) -> tuple[ImageSet, LabelledSetReport]:
    """Read every row of ``manifest`` into one :class:`ImageSet`.

    Args:
        manifest: the CSV manifest (``path``, ``label``, ``patient_id`` columns by default).
        settings: columns, class names (labels map to them by name), frames, bounds.
        image_size: side in pixels of the images the model takes.

    Returns:
        images ``(N, C, S, S)`` float32 in [0, 1] with their class indices, and the report.

    Raises:
        ManifestError: the manifest is missing, unreadable or lacks a column, or no row gives
            an image (the message names the first problems).
    """
    manifest = Path(manifest)
    entries, problems, rows, _ = read_manifest(manifest, settings)
    roots = settings.resolved_roots(manifest)
    kept: list[DecodedRow] = []
    seen: dict[str, int] = {}
    for entry in entries:
        try:
            item = read_row(entry, settings, image_size, roots)
        except DicomReadError as err:
            problems.append(Problem(entry.row, entry.written_path[:SHOW_PATH], err.kind,
                                    err.reason))
            continue
        duplicate = next((seen[u] for u in item.uids if u in seen), None)
        if duplicate is not None:
            problems.append(Problem(entry.row, entry.written_path[:SHOW_PATH], "duplicate",
                                    f"same SOP Instance UID as row {duplicate}: counted once"))
            continue
        seen |= {u: entry.row for u in item.uids}
        kept.append(item)
    problems.sort(key=lambda p: p.row)
    if not kept:
        first = "; ".join(str(p) for p in problems[:3])
        raise ManifestError(f"manifest {manifest}: none of its {rows} rows gives an image "
                            f"({first})")
    names = list(settings.classes) or [
        str(i) for i in range(max(d.entry.label for d in kept) + 1)]
    counts: Counter[str] = Counter()
    for item in kept:
        counts[names[item.entry.label]] += len(item.image)
    report = LabelledSetReport(
        manifest, rows, len(kept), {n: counts.get(n, 0) for n in names}, problems,
        dataset_fingerprint(settings.classes, ((d.entry.written_path, d.entry.label,
                                                d.entry.patient, "test", d.content_sha256)
                                               for d in kept), settings.frames))
    if problems:  # the first of each kind: 100,000 bad rows must not flood the log
        lines, _ = summarise(problems)
        logger.warning("%s: %d of %d rows left out:\n%s", manifest, len(problems), rows,
                       "\n".join(lines))
    images = stack_images([d.image for d in kept], [d.entry.label for d in kept], image_size)
    return images, report
