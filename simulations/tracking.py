"""Optional experiment tracking: a finished run's metrics as TensorBoard event files or as an
MLflow run.

Both are off by default and need optional packages (``pip install -e ".[tracking]"``).

TensorBoard (``medfed report ... --tensorboard DIR``): one sub-folder per run, so TensorBoard
overlays runs. Scalars, by round: ``test/auc``, ``test/loss``, ``test/accuracy``,
``test/macro_f1``; ``hospital_<k>/val_auc``, ``hospital_<k>/val_loss``,
``hospital_<k>/train_loss``; ``privacy/epsilon_hospital_<k>`` (with DP);
``communication/upload_mb`` (all hospitals).

MLflow (``[tracking] mlflow = true`` in a simulation TOML): after the run, a local
store inside the run directory gets one MLflow run in experiment ``[tracking]
mlflow_experiment``: an SQLite file ``<run_dir>/mlflow.db`` (MLflow 3 refuses its old
``mlruns`` folder store unless told otherwise) and artifacts in ``<run_dir>/mlartifacts``;
browse with ``mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow.db``. Logged: the
flattened settings as params
(``data.num_hospitals``, ``federation.strategy``, ...), the same per-round scalars as
TensorBoard (``/`` in names kept, step = round), the summary's numbers as ``final/...``
metrics and ``summary.json`` as an artifact. Without the ``mlflow`` package (``mlflow-skinny``
is enough) it is skipped with a warning: tracking never fails a finished run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from simulations.report import ReportError, Run, load_run

logger = logging.getLogger(__name__)

MLFLOW_DB = "mlflow.db"
"""The MLflow tracking store (SQLite file) inside a run directory."""
MLFLOW_ARTIFACTS = "mlartifacts"
"""The MLflow artifact folder inside a run directory."""


def mlflow_uri(run_dir: Path) -> str:
    """The tracking URI of a run directory's MLflow store."""
    return f"sqlite:///{(Path(run_dir) / MLFLOW_DB).resolve()}"


def run_scalars(run: Run) -> Iterator[tuple[str, float, int]]:
    """``(tag, value, round)`` of every finite per-round scalar of ``run`` (see the module
    docstring); missing values (no DP, an error row) are skipped, not given as NaN."""
    for _, row in run.test_rows.iterrows():
        for name in ("auc", "loss", "accuracy", "macro_f1"):
            yield from _finite(f"test/{name}", row.get(f"test_{name}"), int(row["round"]))
    for _, row in run.hospitals.iterrows():
        step, hospital = int(row["round"]), row["hospital"]
        for name in ("val_auc", "val_loss", "train_loss"):
            yield from _finite(f"hospital_{hospital}/{name}", row.get(name), step)
        yield from _finite(f"privacy/epsilon_hospital_{hospital}", row.get("epsilon"), step)
    if "upload_bytes" in run.hospitals:
        uploads = run.hospitals.groupby("round")["upload_bytes"].sum()
        for step, total in uploads.items():
            yield from _finite("communication/upload_mb", total / 1e6, int(step))


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
        for tag, value, step in run_scalars(run):
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()
    return target


def _finite(tag: str, value, step: int) -> Iterator[tuple[str, float, int]]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return
    if math.isfinite(value):
        yield tag, value, step


def flat_params(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as ``{"data.num_hospitals": "5", ...}`` (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat_params(value, f"{name}.")
        else:
            out[name] = str(value)[:6000]  # MLflow's limit on a param value
    return out


def _summary_metrics(summary: dict[str, Any], prefix: str = "final/") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            out |= _summary_metrics(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                out[f"{prefix}{key}"] = float(value)
    return out


def write_mlflow(run: Run, experiment: str = "medfed") -> str | None:
    """Log ``run`` (a finished run directory, :func:`simulations.report.load_run`) as one MLflow
    run in the run directory's store (:func:`mlflow_uri`).

    Returns the MLflow run id, or None (logged) when the ``mlflow`` package is missing.
    """
    try:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
    except ImportError:
        logger.warning("[tracking] mlflow is on but the mlflow package is not installed "
                       "(pip install -e \".[tracking]\"); %s not logged to MLflow", run.path)
        return None
    client = MlflowClient(tracking_uri=mlflow_uri(run.path))
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=(run.path / MLFLOW_ARTIFACTS).resolve().as_uri())
    mlflow_run = client.create_run(experiment_id, run_name=run.name)
    run_id = mlflow_run.info.run_id
    try:
        params = [Param(k, v) for k, v in flat_params(run.config).items()]
        metrics = [Metric(tag, value, 0, step) for tag, value, step in run_scalars(run)]
        metrics += [Metric(k, v, 0, 0) for k, v in _summary_metrics(run.summary).items()]
        for i in range(0, max(len(params), len(metrics)), 100):  # MLflow's batch limits
            client.log_batch(run_id, metrics=metrics[i:i + 100], params=params[i:i + 100])
        client.log_artifact(run_id, str(run.path / "summary.json"))
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return run_id


def track_run(run_dir: Path, mlflow: bool, experiment: str = "medfed") -> str | None:
    """What the simulation runner calls after a study: MLflow logging when ``mlflow`` is on
    (``[tracking]``); returns the MLflow run id or None."""
    if not mlflow:
        return None
    return write_mlflow(load_run(Path(run_dir)), experiment)
