"""``medfed hospital check``: read everything once and say what is usable and what is wrong."""

from __future__ import annotations

from pathlib import Path

from client.data.config import SiteDataConfig
from client.data.dataset import SiteReport, prepare_site
from client.data.problems import KINDS
from imaging.manifest import SPLITS


def format_report(report: SiteReport, config: SiteDataConfig) -> str:
    """The check report as plain text (it names paths and patients: for the hospital only)."""
    lines = [f"manifest: {report.manifest}",
             f"rows: {report.rows}, usable: {report.usable_rows}, "
             f"left out: {report.rows - report.usable_rows} ({report.error_fraction:.1%})"]
    info = report.manifest_info
    if info is not None and (info.separator != "," or info.skipped_empty):
        names = {",": "comma", ";": "semicolon", "\t": "tab", "|": "bar"}
        lines.append(f"manifest read as {names[info.separator]}-separated "
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
    if report.patients_across_splits:
        lines += ["", f"patients in both train and val in the manifest (all their images moved "
                      f"to train): {len(report.patients_across_splits)}"]
        lines += [f"  {p}" for p in report.patients_across_splits]
    if report.problems:
        lines += ["", f"problems ({len(report.problems)} rows):"]
        for kind in KINDS:
            of_kind = [p for p in report.problems if p.kind == kind]
            if of_kind:
                lines.append(f"  {kind} ({len(of_kind)}):")
                lines += [f"    {p}" for p in of_kind]
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


def check_site(manifest: Path, config: SiteDataConfig, image_size: int) -> tuple[str, bool]:
    """Run the check; returns the report text and whether the data may be trained on.

    Decoding fills the decoded-image cache, so the first round after a check is fast.
    """
    _, report = prepare_site(manifest, config, image_size)
    return format_report(report, config), not report.failures(config.max_error_fraction)
