"""Central evaluation: the global adapter on the coordinator's held-out test set."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, MetricRecord
from peft import PeftModel

from models.adapters import load_adapter_state
from models.data import ImageSet
from models.metrics import evaluate


def central_evaluator(
    model: PeftModel, test_set: ImageSet
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """``evaluate_fn`` for Flower's strategies: test loss, AUC, accuracy, macro-F1 per round.

    The model is the same LoRA model the hospitals train (BatchNorm frozen at its pretrained
    statistics on both sides), so the coordinator scores exactly what the hospitals would run.
    """

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_adapter_state(model, arrays.to_torch_state_dict())
        scores = evaluate(model, test_set.images, test_set.labels)
        return MetricRecord({f"test-{k.replace('_', '-')}": v for k, v in scores.items()})

    return evaluate_fn
