"""A starting adapter trained on public data: what a consortium can do before any hospital trains.

DP-SGD pays for every step it takes on a hospital's images; data that is public already costs
nothing. A consortium can train the adapter on public images of the same kind first and start
the federation from it (``[federation] initial_adapter``). In a simulation, the public data is
part of the dataset's ``val`` split, which no simulated hospital holds (hospitals split ``train``;
the coordinator evaluates on ``test``): a seeded ``fraction`` of it trains the start; the rest
stays unseen, e.g. as the membership attack's non-members in ``simulations.bench dp-utility``.

Usage::

    python -m simulations.public_start --out runs/public-start   # pneumoniamnist, 48 px

writes ``runs/public-start/adapter`` (start a run from it with ``[federation] initial_adapter =
"runs/public-start/adapter"``) and ``runs/public-start/public_start.json`` (what it was trained
on, its hash, its test metrics).
For a backbone whose head has a fixed centre (the CT encoder and the 2D EfficientNet-Lite0,
``models.feature_centre``), the start also centres the head's input on the public images'
mean pooled feature: the same logits, in coordinates where DP-SGD's per-example clipping keeps
what separates the classes.
This is training *without* DP on public data: it protects no one and needs no budget, and it is
only as good a start as the public data is like the hospitals' own.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from client.training import train_local
from core.hashing import file_sha256
from models.adapters import ADAPTER_FILE, save_adapter
from models.config import ModelConfig, TrainConfig
from models.data import ImageSet
from models.feature_centre import CENTRE_MODULE, centre_on
from models.metrics import evaluate
from models.registry import backbone_spec, weights_sha256
from server.rounds import initial_model
from simulations.sites import cached_dataset

logger = logging.getLogger(__name__)

PUBLIC_SPLIT = "val"
"""The dataset split that stands in for public data: no simulated hospital holds it."""


@dataclass(frozen=True)
class PublicStartConfig:
    """How the public start is trained.

    Attributes:
        dataset: MedMNIST-format file stem.
        fraction: share of the ``val`` split that trains the start (seeded); the rest stays
            unseen.
        epochs: passes over those images (AdamW at ``lr``, batch ``batch_size``, logit
            adjustment as in local training).
        batch_size: images per step.
        lr: AdamW learning rate.
        seed: seeds the split of ``val``, the adapter's initialisation and the batch order.
    """

    dataset: str = "pneumoniamnist"
    fraction: float = 0.5
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"public start: fraction must be in (0, 1], got {self.fraction}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("public start: epochs and batch_size must be >= 1 and lr > 0")


def public_split(dataset: str, image_size: int, fraction: float,
                 seed: int) -> tuple[ImageSet, ImageSet]:
    """The ``val`` split cut in two by a seeded permutation: (public part, unseen rest).

    Images are ``(N, C, image_size, image_size)``; the public part holds
    ``round(fraction * N)`` of them.
    """
    pool = cached_dataset(dataset, image_size).splits[PUBLIC_SPLIT]
    order = np.random.default_rng(seed).permutation(len(pool))
    cut = int(round(fraction * len(pool)))
    return pool.subset(np.sort(order[:cut])), pool.subset(np.sort(order[cut:]))


def train_public_start(config: PublicStartConfig, model_config: ModelConfig,
                       out: Path) -> dict[str, object]:
    """Train an adapter on the public part of ``config.dataset`` and save it under ``out``.

    Returns the provenance also written to ``out/public_start.json``: the settings, the number
    of public images, the adapter file's SHA-256 and its metrics on the ``test`` split.
    """
    dataset = cached_dataset(config.dataset, model_config.image_size)
    model_config = replace(model_config, num_classes=dataset.num_classes,
                           weights_sha256=model_config.weights_sha256
                           or weights_sha256(model_config.backbone))
    public, _ = public_split(config.dataset, model_config.image_size, config.fraction,
                             config.seed)
    model = initial_model(model_config, config.seed)
    train = TrainConfig(local_epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                        seed=config.seed)
    loss = train_local(model, public.images, public.labels, train, seed=config.seed)
    spec = backbone_spec(model_config.backbone)
    if CENTRE_MODULE in spec.saved:  # same logits; DP-SGD's clipping then keeps what separates
        centre_on(model, public.images, spec.head)
    test = dataset.splits["test"]
    directory = save_adapter(model, Path(out) / "adapter")
    record: dict[str, object] = {
        "public_start": asdict(config),
        "split": PUBLIC_SPLIT,
        "public_images": len(public),
        "model": asdict(model_config),
        "train_loss": loss,
        "head_centred": CENTRE_MODULE in spec.saved,
        "test": evaluate(model, test.images, test.labels),
        "adapter": str(directory),
        "adapter_sha256": file_sha256(directory / ADAPTER_FILE),
    }
    (Path(out) / "public_start.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> int:
    defaults = PublicStartConfig()
    parser = argparse.ArgumentParser(prog="python -m simulations.public_start",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    parser.add_argument("--dataset", default=defaults.dataset)
    parser.add_argument("--fraction", type=float, default=defaults.fraction)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--lora-r", type=int, default=ModelConfig.lora_r,
                        help="LoRA rank (alpha = 2 r): must match the run that starts from it")
    parser.add_argument("--image-size", type=int, default=ModelConfig.image_size)
    parser.add_argument("--backbone", default=ModelConfig.backbone,
                        help="registry name, e.g. merlin-i3resnet152-ct (with --dataset "
                             "adrenalmnist3d-tissue --image-size 48): must match the run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = PublicStartConfig(dataset=args.dataset, fraction=args.fraction, epochs=args.epochs,
                               batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    model_config = ModelConfig(backbone=args.backbone, image_size=args.image_size,
                               lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
    record = train_public_start(config, model_config, args.out)
    test = record["test"]
    logger.info("public start: %d %s images of %s, test AUC %.4f, accuracy %.4f -> %s (sha256 %s)",
                record["public_images"], PUBLIC_SPLIT, config.dataset, test["auc"],
                test["accuracy"], record["adapter"], record["adapter_sha256"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
