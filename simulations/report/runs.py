"""Run directories as the report reads them: settings, per-round metrics and summary."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

# MedMNIST's label names (one list, the simulations'), so a clinician reads "pneumonia", not
# "class 1".
from core.errors import MedfedError
from simulations.datasets import CLASS_NAMES, class_names

__all__ = ["CLASS_NAMES", "ReportError", "Run", "class_names", "is_simulation", "load_run",
           "run_class_names"]


class ReportError(MedfedError, ValueError):
    """A run directory that cannot be reported on (missing or unreadable files)."""


OVERLAY_FILE = "test-overlays.npz"
"""In a simulated segmentation run's directory: a few test slices with their true and predicted
masks, for the report's overlay figure (simulation only: a deployed coordinator holds no
image)."""

@dataclass
class Run:
    """One run directory, read.

    Attributes:
        path: the run directory.
        config: ``config.toml`` as a nested dict.
        metrics: ``metrics.csv`` (one row per round and hospital, plus ``global`` test rows).
        summary: ``summary.json``.
    """

    path: Path
    config: dict[str, Any]
    metrics: pd.DataFrame
    summary: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def hospitals(self) -> pd.DataFrame:
        return self.metrics[self.metrics.hospital != "global"]

    @property
    def test_rows(self) -> pd.DataFrame:
        return self.metrics[self.metrics.hospital == "global"].sort_values("round")


def load_run(path: Path) -> Run:
    """Read one run directory; a clear error names what is missing."""
    path = Path(path)
    needed = ("config.toml", "metrics.csv", "summary.json")
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise ReportError(f"{path}: not a finished run directory (missing {', '.join(missing)}); "
                          f"give the folder `medfed simulate` wrote (see --run-dir)")
    try:
        config = tomllib.loads((path / "config.toml").read_text())
        metrics = pd.read_csv(path / "metrics.csv", dtype={"hospital": str, "error": str})
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: cannot read the run ({err})") from err
    return Run(path=path, config=config, metrics=metrics, summary=summary)


def is_simulation(run: Run) -> bool:
    """A simulated run (its config names a ``[data]`` source); a deployed run's coordinator
    held no data, so nothing of it is re-scored."""
    return "data" in run.config


def run_class_names(run: Run, num_classes: int) -> list[str]:
    """The study's class names, else the dataset's (older runs), else ``class k``."""
    named = run.config.get("classes") or []
    if len(named) == num_classes:
        return list(named)
    return class_names(str(run.config.get("data", {}).get("dataset")), num_classes)

