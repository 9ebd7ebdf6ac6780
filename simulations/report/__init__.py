"""A study's report: one self-contained HTML file (figures inline) plus the figures as PNG files.

Reads run directories as ``server.records`` and ``simulations.runner`` write them
(``config.toml``, ``metrics.csv``, ``summary.json``, ``adapter/``), reloads the final adapter on
the base model and scores it on the run's test set (ROC, confusion matrix, calibration, a
bootstrap confidence interval for the AUC). Several runs get a comparison table and overlaid
curves. Metrics come from scikit-learn; figures from matplotlib's Agg backend (no display).

Modules: ``runs`` (reading run directories), ``statistics`` (AUC, bootstrap, calibration),
``scoring`` (re-scoring the final adapter), ``figures``, ``page`` (the HTML and PNG files).
"""

from simulations.report.page import build_report, default_out_dir
from simulations.report.runs import CLASS_NAMES, ReportError, Run, class_names, load_run
from simulations.report.scoring import TestScores, score_final_model
from simulations.report.statistics import (
    BOOTSTRAP_RESAMPLES,
    CALIBRATION_BINS,
    bootstrap_auc_ci,
    calibration_bins,
    expected_calibration_error,
    roc_auc,
)

__all__ = ["BOOTSTRAP_RESAMPLES", "CALIBRATION_BINS", "CLASS_NAMES", "ReportError", "Run",
           "TestScores", "bootstrap_auc_ci", "build_report", "calibration_bins", "class_names",
           "default_out_dir", "expected_calibration_error", "load_run", "roc_auc",
           "score_final_model"]
