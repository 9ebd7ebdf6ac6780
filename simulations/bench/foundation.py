"""Federated LoRA on the CT foundation encoder, against its controls, on AdrenalMNIST3D.

Runs the ``ct-foundation`` scenario (5 hospitals, Dirichlet label skew, Merlin's I3ResNet-152
with LoRA on its last stage, volumes as the scenario sets them) and, on the same split and
budget:

- the same federation with the same network at a seeded random initialisation;
- the pooled baseline (every hospital's volumes in one place) of the pretrained run;
- the 2D default backbone (EfficientNet-Lite0) federated on each volume's three orthogonal
  middle slices (``adrenalmnist3d-midslices``) at its default settings and image size;
- the pretrained federation with DP-SGD at each hospital at ``--epsilon`` (whole run), from the
  same public start; by default it trains only the head (``--dp-trainable``), on the features
  the public start centred (``models.feature_centre``), at ``--dp-lr``.

Prints ``pretrained federated auc``, ``random-init federated auc``, ``pooled auc``,
``2d default federated auc``, ``full/adapter bytes``, ``seconds per round`` (the pretrained
run's mean over its rounds; ``setup seconds``: from the start to the initial evaluation, with
the coordinator's test prefix) and
``auc drop at eps=<e>``. The frozen prefix's activations go to ``--cache-dir`` (default
``~/.cache/medfed/ct-prefix``; MedMNIST is public data), so later runs and later invocations
reuse them.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from models.config import OPTIMIZERS, TRAINABLE, TrainConfig
from models.ct_encoder import BATCHNORM_DIR_ENV, PREFIX_CACHE_ENV
from server.rounds import FederationError
from simulations import runner
from simulations.bench.foundation_probe import add_setting_options
from simulations.scenarios import load_scenario

logger = logging.getLogger(__name__)

SCENARIO = "ct-foundation"
FLAT_DEFAULT: dict[str, Any] = {
    "data": {"dataset": "adrenalmnist3d-midslices"},
    "model": {"backbone": "efficientnet-lite0-imagenet", "image_size": 64, "lora_targets": []},
    # The 2D default's own training, not the CT scenario's (its SGD rate collapses this
    # backbone to a constant output).
    "train": {name: getattr(TrainConfig(), name) for name in (
        "optimizer", "lr", "momentum", "batch_size", "local_epochs", "local_steps")},
}
"""Overrides of the comparison run: the 2D default backbone and its default settings on each
volume's three orthogonal middle slices."""


def _overrides(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    values: dict[str, Any] = {"seed": args.seed, "run_dir": str(run_dir), "baselines": [],
                              "data": {"max_train_examples": args.max_train,
                                       "max_test_examples": args.max_test}}
    values["data"]["dataset"] = ("adrenalmnist3d-tissue" if args.intensity == "tissue"
                                 else "adrenalmnist3d")
    federation: dict[str, Any] = {}
    if args.rounds:
        federation["rounds"] = args.rounds
    if args.strategy:
        federation["strategy"] = args.strategy
    if federation:
        values["federation"] = federation
    train: dict[str, Any] = {}
    if args.lr:
        train["lr"] = args.lr
    if args.local_steps >= 0:
        train["local_steps"] = args.local_steps
    if args.local_epochs:
        train["local_epochs"] = args.local_epochs
    if args.optimizer:
        train["optimizer"] = args.optimizer
    if args.momentum is not None:
        train["momentum"] = args.momentum
    if train:
        values["train"] = train
    model: dict[str, Any] = {}
    if args.preset:
        model["lora_targets"] = [args.preset]
    if args.image_size:
        model["image_size"] = args.image_size
    if model:
        values["model"] = model
    return values


def variant_overrides(args: argparse.Namespace, run_dir: Path,
                      extra: dict[str, Any]) -> dict[str, Any]:
    """The scenario overrides of one variant: the options' (:func:`_overrides`), then
    ``extra``'s, table by table (a table in ``extra`` updates the options' table of that
    name; any other value replaces it)."""
    overrides = _overrides(args, run_dir)
    for table, values in extra.items():
        if isinstance(values, dict):
            overrides[table] = overrides.get(table, {}) | values
        else:
            overrides[table] = values
    return overrides


def scenario_intensity() -> str:
    """The intensity of the scenario's dataset: ``tissue`` or ``binary`` (the default of
    ``--intensity``)."""
    return "tissue" if load_scenario(SCENARIO).data.dataset.endswith("-tissue") else "binary"


def _study(args: argparse.Namespace, root: Path, name: str, console: Console,
           extra: dict[str, Any]) -> tuple[dict[str, Any], list[float]]:
    """Run one variant of the scenario; returns its summary and each round's seconds."""
    config = load_scenario(SCENARIO, variant_overrides(args, root / name, extra))
    stamps = [time.monotonic()]
    summary = runner.run_study(config, console,
                               on_round=lambda *_: stamps.append(time.monotonic()))
    rounds = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    auc = summary["federated"]["auc"]
    print(f"  {name}: test auc {auc:.4f} after {summary['rounds']} rounds, "
          f"{summary['wall_time_s']['federated']:.0f} s", flush=True)
    return summary, rounds


def _public_start(args: argparse.Namespace, root: Path, name: str,
                  backbone: str) -> dict[str, Any]:
    """Train a starting adapter on the public ``val`` split for ``backbone`` (the run's model
    settings); returns the overrides that start a federation from it."""
    from dataclasses import replace

    from simulations.public_start import PublicStartConfig, train_public_start

    config = load_scenario(SCENARIO, _overrides(args, root / name))
    record = train_public_start(
        PublicStartConfig(dataset=config.data.dataset, fraction=1.0, epochs=args.public_start,
                          batch_size=config.train.batch_size, lr=args.public_start_lr,
                          seed=args.seed),
        replace(config.model, backbone=backbone), root / name)
    print(f"  {name}: public start test auc {record['test']['auc']:.4f}", flush=True)
    return {"initial_adapter": record["adapter"],
            "initial_adapter_sha256": record["adapter_sha256"]}


def _backbones(args: argparse.Namespace) -> dict[str, str]:
    """The pretrained and random-init encoders' registry names under ``--batchnorm``."""
    from simulations.bench.foundation_probe import backbone_name, setting_volumes

    config = load_scenario(SCENARIO)
    size = args.image_size or config.model.image_size
    calibration = None
    if args.batchnorm == "public":  # public data: no simulated hospital holds the val split
        calibration = setting_volumes(size, args.intensity)["val"][0]
    return {init: backbone_name(init, args.batchnorm, size, args.intensity, calibration,
                                args.batchnorm_dir) for init in ("pretrained", "random")}


def build_parser() -> argparse.ArgumentParser:
    """The bench's command line."""
    parser = argparse.ArgumentParser(prog="python -m simulations.bench foundation")
    parser.add_argument("--quick", action="store_true",
                        help="a development check: 300 training and 100 test volumes, "
                             "2 rounds, no 2D and no DP run")
    parser.add_argument("--rounds", type=int, default=0, help="0: the scenario's")
    parser.add_argument("--strategy", default="", help="aggregation rule (default: the "
                        "scenario's, fedavg), e.g. trimmed-mean")
    parser.add_argument("--lr", type=float, default=0.0, help="0: the scenario's")
    parser.add_argument("--local-steps", type=int, default=-1,
                        help="optimiser steps per hospital and round (-1: the scenario's; "
                             "0: whole epochs)")
    parser.add_argument("--local-epochs", type=int, default=0,
                        help="epochs per hospital and round when not counting steps "
                             "(0: the scenario's)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                        help="local optimiser (default: the scenario's); the DP run uses the "
                             "same one for its noised gradients")
    parser.add_argument("--momentum", type=float, default=None,
                        help="SGD momentum (default: the scenario's)")
    parser.add_argument("--public-start-lr", type=float, default=3e-4,
                        help="AdamW learning rate of the public start")
    parser.add_argument("--public-start", type=int, default=5, metavar="EPOCHS",
                        help="start each federation (and the pooled baseline) from an adapter "
                             "trained this many epochs on the public val split (0: from "
                             "scratch); the random-init control gets its own")
    parser.add_argument("--skip-pooled", action="store_true",
                        help="skip the pooled baseline")
    parser.add_argument("--preset", default="", help="LoRA stage preset (default: the "
                        "scenario's, layer4), e.g. layer3-last6+layer4")
    parser.add_argument("--image-size", type=int, default=0, help="volume side (0: the "
                        "scenario's, 48)")
    parser.add_argument("--max-train", type=int, default=0, help="training volumes (0: all)")
    parser.add_argument("--max-test", type=int, default=0, help="test volumes (0: all)")
    parser.add_argument("--epsilon", type=float, default=8.0,
                        help="DP-SGD target epsilon per hospital over the run (0: skip)")
    parser.add_argument("--dp-lr", type=float, default=0.1,
                        help="learning rate of the DP-SGD run (0: the run's --lr); its steps are "
                             "clipped per example, so it wants a larger rate than --lr")
    parser.add_argument("--dp-max-grad-norm", type=float, default=1.0,
                        help="per-example gradient clipping norm of the DP-SGD run")
    parser.add_argument("--dp-trainable", choices=TRAINABLE, default="head",
                        help="what the DP-SGD run trains (train.trainable): by default the head "
                             "only, on the public start's centred features (docs/ct-foundation.md)")
    parser.add_argument("--skip-2d", action="store_true", help="skip the 2D backbone's run")
    parser.add_argument("--skip-random", action="store_true",
                        help="skip the random-init control")
    add_setting_options(parser, batchnorm="shipped", intensity=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="keep the runs here (default: a temporary directory)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.intensity is None:
        args.intensity = scenario_intensity()
    if args.quick:
        args.max_train = args.max_train or 300
        args.max_test = args.max_test or 100
        args.rounds = args.rounds or 2
        args.skip_2d, args.epsilon = True, 0.0
    logging.getLogger("flwr").setLevel(logging.ERROR)
    # Read by every process that builds the encoder (Ray's workers inherit it).
    os.environ[PREFIX_CACHE_ENV] = str(args.cache_dir)
    os.environ[BATCHNORM_DIR_ENV] = str(args.batchnorm_dir)
    backbones = _backbones(args)
    console = Console(quiet=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.run_dir or Path(tmp)
        starts = {init: _public_start(args, root, f"public-start-{init}", name)
                  if args.public_start else {} for init, name in backbones.items()
                  if init == "pretrained" or not args.skip_random}
        pretrained, rounds = _study(args, root, "pretrained", console, {
            "baselines": [] if args.skip_pooled else ["pooled"],
            "model": {"backbone": backbones["pretrained"]}, "federation": starts["pretrained"]})
        figures = {"pretrained federated auc": pretrained["federated"]["auc"]}
        if not args.skip_random:
            try:
                random_init, _ = _study(args, root, "random-init", console,
                                        {"model": {"backbone": backbones["random"]},
                                         "federation": starts["random"]})
                figures["random-init federated auc"] = random_init["federated"]["auc"]
            except FederationError as err:
                # With the weights' own BatchNorm statistics (the initial (0, 1) at random
                # init) its activations grow without bound; --batchnorm public is the fair
                # control. Say so rather than lose the other figures.
                figures["random-init federated auc"] = f"diverged ({str(err)[:160]})"
        if not args.skip_pooled:
            figures["pooled auc"] = pretrained["pooled"]["auc"]
        if not args.skip_2d:
            flat, _ = _study(args, root, "2d-default", console, FLAT_DEFAULT)
            figures["2d default federated auc"] = flat["federated"]["auc"]
        sizes = pretrained["bytes"]
        figures["full/adapter bytes"] = sizes["full_model"] / sizes["adapter"]
        # rounds[0] runs from the start to round 0's evaluation (Ray, model builds, the test
        # volumes' prefix); the rest are the federated rounds themselves.
        figures["seconds per round"] = sum(rounds[1:]) / max(1, len(rounds) - 1)
        figures["setup seconds"] = rounds[0]
        if args.epsilon:
            # DP-SGD steps its noised gradients with the same optimiser as the reference run.
            train = load_scenario(SCENARIO, _overrides(args, root)).train
            private, _ = _study(args, root, f"dp-eps{args.epsilon:g}", console, {
                "privacy": {"dpsgd": True, "dp_target_epsilon": args.epsilon,
                            "dp_optimizer": train.optimizer, "dp_momentum": train.momentum,
                            "dp_lr": args.dp_lr, "dp_max_grad_norm": args.dp_max_grad_norm},
                "train": {"trainable": args.dp_trainable},
                "model": {"backbone": backbones["pretrained"]},
                "federation": starts["pretrained"]})
            figures[f"auc drop at eps={args.epsilon:g}"] = (
                pretrained["federated"]["auc"] - private["federated"]["auc"])
    for name, value in figures.items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    print(f"bench seconds: {time.monotonic() - started:.0f}")
    return 0
