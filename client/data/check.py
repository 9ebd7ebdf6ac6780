"""``medfed hospital check``: read everything once and say what is usable and what is wrong.

The report lists at most :data:`~imaging.problems.SHOWN_PER_KIND` problems of each kind (and of
warnings, and of patients in both splits) and counts the rest, so 100,000 bad rows stay
readable; :func:`write_report` writes the full, uncapped report to a file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from client.data.config import SiteDataConfig
from client.data.dataset import SiteReport, prepare_site
from core.errors import MedfedError
from imaging.manifest import SPLITS
from imaging.problems import SHOWN_PER_KIND, summarise

logger = logging.getLogger(__name__)

_SEPARATOR_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "bar"}


def _summary_lines(report: SiteReport) -> list[str]:
    """Rows, how the manifest was read, images per class and split, patients per split."""
    lines = [f"manifest: {report.manifest}",
             f"rows: {report.rows}, usable: {report.usable_rows}, "
             f"left out: {report.rows - report.usable_rows} ({report.error_fraction:.1%})"]
    info = report.manifest_info
    if info is not None and (info.separator != "," or info.skipped_empty):
        lines.append(f"manifest read as {_SEPARATOR_NAMES[info.separator]}-separated "
                     f"{info.encoding}; {info.skipped_empty} empty rows skipped")
    lines += ["", "images per class and split:"]
    width = max([len(c) for c in report.classes] + [5])
    lines.append(f"  {'class':<{width}}  " + "  ".join(f"{s:>7}" for s in SPLITS))
    for name in report.classes:
        lines.append(f"  {name:<{width}}  " + "  ".join(
            f"{report.images.get(s, {}).get(name, 0):>7}" for s in SPLITS))
    lines.append(f"  {'total':<{width}}  " + "  ".join(
        f"{report.split_images(s):>7}" for s in SPLITS))
    lines.append("patients per split: " + ", ".join(
        f"{s} {report.patients.get(s, 0)}" for s in SPLITS))
    for split, (low, median, high) in report.images_per_patient.items():
        lines.append(f"images per patient ({split}): min {low}, median {median:g}, max {high}")
    return lines


def _detail_lines(report: SiteReport, per_kind: int | None) -> tuple[list[str], int]:
    """Patients in both splits, problems by kind and warnings, each capped at ``per_kind``
    lines (None: all); and how many lines the caps left out."""
    lines: list[str] = []
    hidden = 0
    across = report.patients_across_splits
    if across:
        shown = across if per_kind is None else across[:per_kind]
        lines += ["", f"patients in both train and val in the manifest (all their images moved "
                      f"to train): {len(across)}"]
        lines += [f"  {p}" for p in shown]
        if len(across) > len(shown):
            hidden += len(across) - len(shown)
            lines.append(f"  ... and {len(across) - len(shown):,} more patients")
    for title, items in ((f"problems ({len(report.problems)} rows):", report.problems),
                         (f"warnings ({len(report.warnings)} rows, used all the same):",
                          report.warnings)):
        if items:
            listed, left_out = summarise(items, per_kind)
            lines += ["", title, *listed]
            hidden += left_out
    return lines, hidden


def format_report(report: SiteReport, config: SiteDataConfig,
                  per_kind: int | None = SHOWN_PER_KIND, full_report: Path | None = None) -> str:
    """The check report as plain text (it names paths and patients: for the hospital only).

    Args:
        report: what :func:`prepare_site` found.
        config: the settings it ran with (for the error budget).
        per_kind: problems listed in full per kind (and warnings, patients in both splits);
            the rest are counted. None lists everything.
        full_report: where the uncapped report was written, named when something was left out.
    """
    lines = _summary_lines(report)
    details, hidden = _detail_lines(report, per_kind)
    lines += details
    if hidden:
        where = (f"the full list is in {full_report}" if full_report is not None else
                 "run 'medfed hospital check' with --report FILE for the full list")
        lines.append(f"({hidden:,} lines left out above: {where})")
    if report.split_images("val") == 0 and report.usable_rows:
        lines += ["", "warning: no validation images; the coordinator gets no validation "
                      "metrics from this hospital (raise val_fraction or add 'val' rows)"]
    lines += ["", f"fingerprint: {report.fingerprint}"]
    failures = report.failures(config.max_error_fraction)
    if failures:
        lines.append("NOT READY: " + "; ".join(failures))
    elif report.problems:
        lines.append(f"ready: training would use {report.usable_rows} of {report.rows} rows; "
                     f"{report.rows - report.usable_rows} left out (listed above)")
    else:
        lines.append(f"ready: all {report.rows} rows usable")
    return "\n".join(lines)


class ReportFileError(MedfedError, ValueError):
    """The full check report cannot be written where it was asked for."""


def write_report(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by its owner only (it names patients).

    Raises:
        ReportFileError: the folder is missing or not writable, or the disk is full.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        raise ReportFileError(f"cannot write the check report {path} ({err.strerror or err}): "
                              "give --report a file in a folder you can write to") from err


def check_site(manifest: Path, config: SiteDataConfig, image_size: int,
               report_file: Path | None = None) -> tuple[str, bool]:
    """Run the check; returns the report text (capped) and whether the data may be trained on.

    Decoding fills the decoded-image cache, so the first round after a check is fast.

    Args:
        report_file: where to write the full, uncapped report; None writes none.

    Raises:
        ManifestError: the manifest itself is unusable.
        ReportFileError: ``report_file`` cannot be written.
    """
    if report_file is not None and not os.access(Path(report_file).parent, os.W_OK):
        raise ReportFileError(f"cannot write the check report {report_file}: its folder is "
                              "missing or not writable; give --report a file in a folder you "
                              "can write to")
    _, report = prepare_site(manifest, config, image_size)
    if report_file is not None:
        write_report(report_file, format_report(report, config, per_kind=None))
        logger.info("check report written to %s", report_file)
    return (format_report(report, config, full_report=report_file),
            not report.failures(config.max_error_fraction))
