"""MedMNIST's class names live in one place (``simulations.datasets``): the report names a
simulated run's classes from that list, so a name changed there changes in the report too."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import simulations.datasets as datasets
from simulations.report import runs


def test_the_report_uses_the_simulations_class_names(monkeypatch):
    assert runs.CLASS_NAMES is datasets.CLASS_NAMES and runs.class_names is datasets.class_names
    run = runs.Run(Path("x"), {"data": {"dataset": "breastmnist"}}, pd.DataFrame(), {})
    assert runs.run_class_names(run, 2) == ["malignant", "normal or benign"]
    monkeypatch.setitem(datasets.CLASS_NAMES, "breastmnist", ["malignant", "benign"])
    assert runs.run_class_names(run, 2) == ["malignant", "benign"]
    # A study's own names come first; unknown counts fall back to "class k".
    named = runs.Run(Path("y"), {"classes": ["a", "b"]}, pd.DataFrame(), {})
    assert runs.run_class_names(named, 2) == ["a", "b"]
    assert runs.run_class_names(run, 3) == ["class 0", "class 1", "class 2"]
