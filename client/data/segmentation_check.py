"""``medfed hospital check`` for a segmentation site: its manifest read as a round reads it.

A segmentation manifest (``imaging.segmentation``: columns ``image``, ``mask``, ``patient_id``,
``split``) is checked row by row with the same reader and guards as training
(:func:`imaging.segmentation.load_cases`: files inside the allowed folders, header sizes before
decoding, image and mask on one grid, mask values among the hospital's declared classes). The
report counts usable cases and patients per split, the cases whose mask holds no structure
(never used: a box prompt needs one), the volumes' shapes and voxel sizes, and every problem by
kind; the site is ready when the share of unusable rows is within ``max_error_fraction`` and at
least one training and one validation case hold the structure.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np

from client.data.check import write_report
from client.data.config import SiteDataConfig
from client.segmentation_site import mask_classes
from imaging.problems import Problem
from imaging.segmentation import SegmentationCase, load_cases

SHOWN_PER_KIND = 5
"""Problems listed per kind in the printed report (the ``--report`` file lists all)."""


def is_segmentation_manifest(manifest: Path) -> bool:
    """Whether ``manifest``'s header names both an ``image`` and a ``mask`` column."""
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False  # the classification reader reports what is wrong with it
    names = {h.strip().casefold() for h in header}
    return {"image", "mask"} <= names


def _splits(cases: list[SegmentationCase]) -> list[str]:
    lines = []
    for split in ("train", "val", "test"):
        chosen = [c for c in cases if c.split == split]
        if chosen:
            lines.append(f"  {split:6s} cases {len(chosen):5d}  patients "
                         f"{len({c.patient_id for c in chosen}):5d}  without the structure "
                         f"{sum(not c.mask.any() for c in chosen):4d}")
    return lines


def _geometry(cases: list[SegmentationCase]) -> list[str]:
    if not cases:
        return []
    shapes = np.array([c.mask.shape for c in cases])
    spacing = np.array([np.linalg.norm(c.affine[:3, :3], axis=0) for c in cases])
    return [f"volume shape (voxels): min {tuple(int(v) for v in shapes.min(0))}, "
            f"max {tuple(int(v) for v in shapes.max(0))}",
            f"voxel size (mm): min {tuple(round(float(v), 2) for v in spacing.min(0))}, "
            f"max {tuple(round(float(v), 2) for v in spacing.max(0))}"]


def _problems(problems: list[Problem], per_kind: int | None) -> list[str]:
    if not problems:
        return []
    lines = [f"problems ({len(problems)} rows):"]
    for kind, count in sorted(Counter(p.kind for p in problems).items()):
        lines.append(f"  {kind} ({count}):")
        shown = [p for p in problems if p.kind == kind][:per_kind]
        lines += [f"    row {p.row} ({p.path}): {p.reason}" for p in shown]
        if len(shown) < count:
            lines.append(f"    ... {count - len(shown)} more (the --report file lists all)")
    return lines


def _verdict(cases: list[SegmentationCase], problems: list[Problem],
             config: SiteDataConfig) -> tuple[str, bool]:
    rows = len(cases) + len(problems)
    share = len(problems) / rows if rows else 1.0
    with_structure = {s for s in ("train", "val")
                      if any(c.split == s and c.mask.any() for c in cases)}
    if share > config.max_error_fraction:
        return (f"NOT READY: {len(problems)} of {rows} rows ({share:.1%}) are unusable, above "
                f"the allowed {config.max_error_fraction:.1%} (max_error_fraction)", False)
    if missing := [s for s in ("train", "val") if s not in with_structure]:
        return (f"NOT READY: no usable {' or '.join(missing)} case holds the structure (a "
                f"round needs both: give those rows split 'train' and 'val')", False)
    return f"ready: {len(cases)} of {rows} rows usable", True


def check_segmentation_site(manifest: Path, config: SiteDataConfig,
                            report_file: Path | None = None) -> tuple[str, bool]:
    """Check a segmentation manifest; returns the report text and whether a round can use it.

    ``config.classes`` name the mask values in order (value 0 the background); with none the
    masks are taken to be 0 (background) and 1. ``config.allowed_roots`` confine the files
    (default: the manifest's folder).

    Raises:
        ManifestError: the manifest itself is unusable.
        ReportFileError: ``report_file`` cannot be written.
    """
    declared, _ = mask_classes(config.classes, ())
    roots = tuple(Path(r) for r in config.allowed_roots) or None
    cases, problems = load_cases(manifest, declared, roots)
    rows = len(cases) + len(problems)
    share = len(problems) / rows if rows else 0.0
    verdict, ready = _verdict(cases, problems, config)
    head = [f"segmentation manifest: {manifest}",
            f"rows: {rows}, usable: {len(cases)}, left out: {len(problems)} ({share:.1%})",
            f"mask values declared: {list(declared)} ({', '.join(config.classes) or 'unnamed'})",
            "", "cases per split:", *_splits(cases), *_geometry(cases), ""]
    if report_file is not None:
        write_report(report_file, "\n".join([*head, *_problems(problems, None), verdict]))
    return "\n".join([*head, *_problems(problems, SHOWN_PER_KIND), verdict]), ready
