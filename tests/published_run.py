"""A short real run that publishes an adapter (and its card), for the card and predict tests."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from client.app import build_client_app
from models.config import ModelConfig, TrainConfig
from models.registry import weights_sha256
from server.config import FederationConfig
from server.records import RunRecords
from server.rounds import run_federation
from server.study import EvaluationConfig
from simulations.config import DataConfig
from simulations.inprocess import InProcessGrid
from simulations.sites import SimulatedSiteLoader

CLASSES = ["normal", "pneumonia"]
PRIOR = [0.3, 0.7]


def short_run(run_dir: Path, rounds: int = 1) -> RunRecords:
    """Three real PneumoniaMNIST hospitals (120 training images in all), ``rounds`` rounds of
    2 local steps at 32 px, in process; publishes ``run_dir/adapter`` with its card."""
    data = DataConfig(num_hospitals=3, max_train_examples=120, max_test_examples=64)
    grid = InProcessGrid(build_client_app(SimulatedSiteLoader(data, 0)),
                         {10 + k: {"partition-id": k} for k in range(3)})
    model = ModelConfig(image_size=32, lora_r=4, lora_alpha=8,
                        weights_sha256=weights_sha256("efficientnet-lite0-imagenet"))
    federation = FederationConfig(rounds=rounds, min_hospitals=3, task="pneumonia-cxr")
    records = RunRecords(Path(run_dir))
    run_federation(grid, federation, model, replace(TrainConfig(), local_steps=2), None,
                   records, classes=CLASSES, evaluation=EvaluationConfig(prior=PRIOR))
    return records
