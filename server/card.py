"""The published adapter's card, written where the round loop publishes the adapter.

:func:`publish_card` is called once per run, by :func:`server.rounds.run_federation` right
after it saves ``RUN_DIR/adapter/``: simulations and the deployed coordinator publish through
the same call, so every published adapter carries ``adapter/card.json`` (``models.card``).
"""

from __future__ import annotations

import importlib.metadata
import logging
import subprocess
from dataclasses import asdict
from pathlib import Path

from peft import PeftModel

from imaging.preprocessing import describe_preprocessing
from models.card import AdapterCard, Decision, ModelPin, PrivacyRecord, write_card
from models.config import ModelConfig
from models.metrics import RECORDED_METRIC_NAMES
from models.registry import backbone_spec, weights_sha256
from privacy.config import DPConfig
from server.config import FederationConfig
from server.records import RunRecords
from server.study import EvaluationConfig

logger = logging.getLogger(__name__)

DECISION_RULE = "argmax of the class probabilities (softmax of the published adapter's logits)"
SEGMENTATION_RULE = ("mask logit > 0 on each slice's own grid (sigmoid 0.5), per box prompt: the "
                     "structure's tight box, or the whole slice (automatic mode)")


def medfed_version() -> str:
    """The installed medfed's version (``unknown`` when it is not installed)."""
    try:
        return importlib.metadata.version("medfed")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def code_commit() -> str:
    """The git commit of the code that runs (``unknown`` outside a git checkout)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else "unknown"


def _privacy(dp: DPConfig | None, records: RunRecords) -> PrivacyRecord:
    """The run's DP settings and the largest epsilon the hospitals reported."""
    reported = records.privacy_summary()
    settings = asdict(dp) if dp is not None else {}
    parameters: dict[str, float | str] = {
        k: int(v) if isinstance(v, bool) else v for k, v in settings.items()
        if isinstance(v, int | float | str)}
    return PrivacyRecord(dpsgd=bool(dp and dp.dpsgd), update_dp=bool(dp and dp.update_dp),
                         parameters=parameters, epsilon_max=reported.get("epsilon_max"),
                         delta=reported.get("delta"))


def _validation(records: RunRecords, published_round: int) -> dict[str, float]:
    """The combined validation metrics of the published round (``examples`` included)."""
    row = next((r for r in records.test_history() if r["round"] == published_round), {})
    values = {name: row.get(f"val_{name}") for name in RECORDED_METRIC_NAMES}
    values["examples"] = row.get("val_examples")
    return {k: float(v) for k, v in values.items() if v is not None and v == v}


def _targets(model_config: ModelConfig, task: str) -> list[str]:
    """The LoRA targets the card pins: the run's; a segmentation run's defaults named, so that
    the adapter is rebuilt with ``models.segmentation.build_segmenter(targets=...)``."""
    if model_config.lora_targets or task != "segmentation":
        return list(model_config.lora_targets)
    return list(backbone_spec(model_config.backbone).default_targets)


def publish_card(records: RunRecords, federation: FederationConfig, model_config: ModelConfig,
                 model: PeftModel, *, classes: list[str], evaluation: EvaluationConfig,
                 dp: DPConfig | None, published_round: int, selection: str) -> Path:
    """Write ``records.run_dir/adapter/card.json`` for the adapter just saved there.

    Args:
        records: the run's records (validation metrics, hospitals, reported epsilons).
        federation, model_config, evaluation, dp: the run's settings.
        model: the LoRA model holding the published adapter (for its normalisation).
        classes: the study's class names (empty: class indices ``"0"``, ``"1"``...).
        published_round: the round whose adapter was published.
        selection: how that round was chosen, in words.

    Returns:
        The card's path.
    """
    names = list(classes) or [str(i) for i in range(model_config.num_classes)]
    task = backbone_spec(model_config.backbone).task
    trained = {r["hospital"] for r in records.train_rows() if r.get("num_examples")}
    card = AdapterCard(
        format=1, study=records.run_dir.name, declared_task=federation.task,
        task=task, classes=names,
        model=ModelPin(backbone=model_config.backbone,
                       weights_sha256=(model_config.weights_sha256
                                       or weights_sha256(model_config.backbone)),
                       lora_r=model_config.lora_r, lora_alpha=model_config.lora_alpha,
                       lora_dropout=model_config.lora_dropout,
                       lora_targets=_targets(model_config, task)),
        preprocessing=describe_preprocessing(model_config, model),
        rounds=federation.rounds, published_round=published_round, hospitals=len(trained),
        strategy=federation.strategy, validation=_validation(records, published_round),
        decision=Decision(rule=SEGMENTATION_RULE if task == "segmentation" else DECISION_RULE,
                          prior=list(evaluation.prior), select_by=evaluation.select_by,
                          selection=selection),
        privacy=_privacy(dp, records),
        secure_aggregation=federation.secure_aggregation.enabled,
        medfed_version=medfed_version(), code_commit=code_commit())
    return write_card(records.run_dir / "adapter", card)
