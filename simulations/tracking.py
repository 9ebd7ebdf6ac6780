"""Optional experiment tracking: a finished run's metrics as TensorBoard event files.

Off by default (``medfed report ... --tensorboard DIR``); needs the ``tensorboard`` package
(``pip install -e ".[tracking]"``). One sub-folder per run, so TensorBoard overlays runs.
Scalars, by round: ``test/auc``, ``test/loss``, ``test/accuracy``, ``test/macro_f1``;
``hospital_<k>/val_auc``, ``hospital_<k>/val_loss``, ``hospital_<k>/train_loss``;
``privacy/epsilon_hospital_<k>`` (with DP); ``communication/upload_mb`` (all hospitals).
"""

from __future__ import annotations

import math
from pathlib import Path

from simulations.report import ReportError, Run


def write_tensorboard(run: Run, log_dir: Path) -> Path:
    """Write ``run``'s metrics under ``log_dir/<run name>``; return that folder."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ReportError("TensorBoard output needs the tensorboard package: "
                          "pip install -e \".[tracking]\"") from err
    target = Path(log_dir) / run.name
    writer = SummaryWriter(log_dir=str(target))
    try:
        for _, row in run.test_rows.iterrows():
            for name in ("auc", "loss", "accuracy", "macro_f1"):
                _scalar(writer, f"test/{name}", row.get(f"test_{name}"), int(row["round"]))
        for _, row in run.hospitals.iterrows():
            step, hospital = int(row["round"]), row["hospital"]
            for name in ("val_auc", "val_loss", "train_loss"):
                _scalar(writer, f"hospital_{hospital}/{name}", row.get(name), step)
            _scalar(writer, f"privacy/epsilon_hospital_{hospital}", row.get("epsilon"), step)
        uploads = run.hospitals.groupby("round")["upload_bytes"].sum()
        for step, total in uploads.items():
            _scalar(writer, "communication/upload_mb", total / 1e6, int(step))
    finally:
        writer.close()
    return target


def _scalar(writer, tag: str, value, step: int) -> None:
    """One scalar; missing values (no DP, an error row) are skipped, not logged as NaN."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return
    if math.isfinite(value):
        writer.add_scalar(tag, value, step)
