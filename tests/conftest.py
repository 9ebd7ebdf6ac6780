"""Shared fixtures: real MedMNIST data from ../shared/data, small model settings."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("FLWR_HOME", os.path.join(os.path.dirname(__file__), "..", ".flwr"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from models.config import ModelConfig  # noqa: E402
from models.registry import weights_sha256  # noqa: E402

SMALL_IMAGE = 32


@pytest.fixture(scope="session")
def pneumonia_small():
    """PneumoniaMNIST at 32 px (real images, resized)."""
    from simulations.datasets import load_medmnist

    return load_medmnist("pneumoniamnist", SMALL_IMAGE)


@pytest.fixture(scope="module")
def site(request, pneumonia_small):
    """A small hospital of real PneumoniaMNIST images at 32 px: 64 training and 32 validation
    images drawn with seed 0 (drawn independently, so they may overlap). A test module that
    needs another size sets ``SITE = (train, val, seed)``."""
    from client.site import SiteData

    train_count, val_count, seed = getattr(request.module, "SITE", (64, 32, 0))
    train = pneumonia_small.splits["train"]
    rng = np.random.default_rng(seed)
    return SiteData(train=train.subset(rng.choice(len(train), train_count, replace=False)),
                    val=train.subset(rng.choice(len(train), val_count, replace=False)))


@pytest.fixture
def small_model_config() -> ModelConfig:
    """EfficientNet-Lite0 at 32 px, rank 4, pinned to the shipped weights."""
    return ModelConfig(
        image_size=SMALL_IMAGE, num_classes=2, lora_r=4, lora_alpha=8,
        weights_sha256=weights_sha256("efficientnet-lite0-imagenet"),
    )


@pytest.fixture(scope="session")
def published_run(tmp_path_factory):
    """A run directory published by a short real run (``tests/published_run.py``): its
    ``adapter/`` holds the adapter and its card. Read only: copy it to tamper with it."""
    from published_run import short_run

    path = tmp_path_factory.mktemp("published") / "pneumonia-study"
    short_run(path)
    return path
