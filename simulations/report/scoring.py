"""Re-scoring a finished run: its final adapter on its base model, on its test set."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from simulations.report.runs import ReportError, Run
from simulations.report.statistics import bootstrap_auc_ci, expected_calibration_error, roc_auc

logger = logging.getLogger(__name__)


@dataclass
class TestScores:
    """The final global model on the run's test set.

    Attributes:
        labels: ``(N,)`` true classes.
        probs: ``(N, K)`` predicted class probabilities.
        auc: ROC AUC (binary: positive class; multi-class: one-vs-rest macro).
        auc_ci: 95% percentile bootstrap interval of the AUC (``BOOTSTRAP_RESAMPLES`` resamples).
        ece: expected calibration error of the top-class confidence, in [0, 1].
    """

    labels: np.ndarray
    probs: np.ndarray
    auc: float
    auc_ci: tuple[float, float]
    ece: float


def _known_settings(obj: Any, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` without the settings this version of medfed does not know (a run written by
    an older or newer version), each one logged: the report needs the model and data only."""
    from dataclasses import fields, is_dataclass

    known = {f.name: getattr(obj, f.name) for f in fields(obj)}
    kept = {}
    for key, value in values.items():
        if key not in known:
            logger.warning("%s: config.toml setting '%s' is unknown here; ignored", where, key)
        elif is_dataclass(known[key]) and isinstance(value, dict):
            kept[key] = _known_settings(known[key], value, f"{where}.{key}")
        else:
            kept[key] = value
    return kept


def score_final_model(run: Run) -> TestScores:
    """Reload the run's final adapter on its base model and score it on the run's test set."""
    import torch
    from peft import PeftModel

    from models.metrics import predict
    from models.registry import build_base_model
    from simulations.config import ConfigError, SimulationConfig, with_overrides
    from simulations.sites import held_out_test_set

    if not (run.path / "adapter").is_dir():
        raise ReportError(f"{run.path}: no adapter/ folder; the run did not finish")
    try:
        config = with_overrides(SimulationConfig(), _known_settings(SimulationConfig(),
                                                                    run.config, run.name))
    except ConfigError as err:
        raise ReportError(f"{run.path}: config.toml does not load ({err})") from err
    model = PeftModel.from_pretrained(build_base_model(config.model), run.path / "adapter")
    test = held_out_test_set(config.data, config.model.image_size, config.seed)
    with torch.no_grad():
        probs = predict(model, test.images).softmax(dim=1).numpy()
    labels = test.labels.numpy()
    return TestScores(labels=labels, probs=probs, auc=roc_auc(labels, probs),
                      auc_ci=bootstrap_auc_ci(labels, probs, seed=config.seed),
                      ece=expected_calibration_error(labels, probs))
