"""Linear probes on the CT encoder's pooled features: choose input size, intensities and
BatchNorm handling before spending a federated run on them.

For one setting (input size, pretrained or random-init weights, BatchNorm statistics as
shipped or estimated on the public ``val`` split, mask intensities as stored or mapped to
fat/soft-tissue HU) it computes, for every volume of AdrenalMNIST3D's ``train`` and ``test``
splits, the pooled layer3 and layer4 outputs, fits a standardised logistic regression on the
whole ``train`` split (C chosen by 5-fold cross-validated AUC) and prints its ``test`` AUC:

    python -m simulations.bench foundation-probe --size 48 --init pretrained --batchnorm public

The frozen prefix of the ``layer3-last6+layer4`` preset goes through the encoder's prefix cache
(``--cache-dir``), with the same keys a federated run of the same setting uses, so the probe
also warms the cache for that run. BatchNorm statistics estimated on the public split are kept
in ``--batchnorm-dir`` under a name built from everything they depend on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from models import ct_encoder
from models.config import ModelConfig
from models.registry import CT_BACKBONE, CT_RANDOM_BACKBONE, build_base_model, weights_sha256
from models.volume_transforms import masks_as_tissue

logger = logging.getLogger(__name__)

DATASET = "adrenalmnist3d"
SPLIT_BLOCK = sum(ct_encoder.LAYERS[:2]) + ct_encoder.LAYERS[2] - 6
"""First block of ``layer3-last6``: the prefix cached here is that preset's."""
LAYER3_END = sum(ct_encoder.LAYERS[:3])
DEFAULT_CACHE = Path.home() / ".cache" / "medfed" / "ct-prefix"
DEFAULT_BATCHNORM = Path.home() / ".cache" / "medfed" / "ct-batchnorm"


def setting_volumes(size: int, intensity: str) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """AdrenalMNIST3D's splits at ``size`` voxels: ``(N, 1, S, S, S)`` volumes and labels."""
    from simulations.sites import cached_dataset

    data = cached_dataset(DATASET, size)
    out = {}
    for split, images in data.splits.items():
        volumes = images.images
        if intensity == "tissue":
            volumes = masks_as_tissue(volumes)
        out[split] = (volumes, images.labels.numpy())
    return out


def public_batchnorm(init: str, size: int, intensity: str, calibration: torch.Tensor | None,
                     folder: Path) -> str:
    """SHA-256 of the encoder's BatchNorm statistics estimated on the public ``calibration``
    volumes (stored as ``<sha256>.npz`` in ``folder``; a recipe-named copy lets later calls
    reuse it)."""
    pretrained = init == "pretrained"
    base = weights_sha256(CT_BACKBONE) if pretrained else ct_encoder.random_init_sha256()
    recipe = folder / f"{base[:16]}-{DATASET}-val-{intensity}-{size}.npz"
    if not recipe.is_file():
        net = ct_encoder.build_i3resnet152(2, pretrained=pretrained).requires_grad_(False)
        started = time.monotonic()
        ct_encoder.estimate_batchnorm(ct_encoder.CTVolumeClassifier(net, cache_bytes=0),
                                      calibration)
        ct_encoder.save_batchnorm_stats(net, recipe)
        logger.info("BatchNorm estimated on %d volumes in %.0f s: %s", len(calibration),
                    time.monotonic() - started, recipe)
    return ct_encoder.store_batchnorm_file(recipe, folder)


def backbone_name(init: str, batchnorm: str, size: int, intensity: str,
                  calibration: torch.Tensor | None, folder: Path) -> str:
    """The registry name of one setting's encoder (``+bn:<sha256>`` for public statistics,
    estimated on ``calibration`` and stored in ``folder`` when not there yet)."""
    name = CT_BACKBONE if init == "pretrained" else CT_RANDOM_BACKBONE
    if batchnorm == "public":
        name += ct_encoder.BATCHNORM_MARK + public_batchnorm(init, size, intensity, calibration,
                                                             folder)
    return name


def build(name: str) -> ct_encoder.CTVolumeClassifier:
    """The frozen encoder (no LoRA) of a registry name, for features."""
    classifier = build_base_model(ModelConfig(backbone=name, num_classes=2))
    classifier.requires_grad_(False)
    return classifier.eval()


PREFIX_SPLITS = {"layer3-last6": SPLIT_BLOCK, "layer4": LAYER3_END}
"""The LoRA presets whose frozen prefix a probe can cache, and their first adapted block."""


def pooled_features(classifier: ct_encoder.CTVolumeClassifier, volumes: torch.Tensor,
                    batch_size: int = 8, split: int = SPLIT_BLOCK
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Pooled layer3 and layer4 outputs ``(N, 1024)``, ``(N, 2048)``, through the prefix cache
    (cached up to block ``split``, at most the end of layer3)."""
    if split > LAYER3_END:
        raise ValueError(f"split {split} is past layer3 (block {LAYER3_END})")
    blocks = ct_encoder._blocks(classifier.net)
    third, fourth = [], []
    with torch.no_grad():
        for i in range(0, len(volumes), batch_size):
            x = classifier._prefix(volumes[i : i + batch_size], split)
            for _, block in blocks[split:LAYER3_END]:
                x = block(x)
            third.append(x.mean((2, 3, 4)).numpy())
            for _, block in blocks[LAYER3_END:]:
                x = block(x)
            fourth.append(x.mean((2, 3, 4)).numpy())
    return np.concatenate(third), np.concatenate(fourth)


def probe_auc(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray,
              test_labels: np.ndarray) -> tuple[float, float]:
    """Test AUC of a standardised logistic regression fitted on ``train`` (C by 5-fold CV AUC),
    and the chosen C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
        {"logisticregression__C": [1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 1.0]},
        scoring="roc_auc", cv=StratifiedKFold(5, shuffle=True, random_state=0))
    probe.fit(train, train_labels)
    scores = probe.predict_proba(test)[:, 1]
    chosen = float(probe.best_params_["logisticregression__C"])
    return float(roc_auc_score(test_labels, scores)), chosen


def add_setting_options(parser: argparse.ArgumentParser, batchnorm: str,
                        intensity: str | None = "binary") -> None:
    """The options a probe and a federated bench share: BatchNorm statistics, mask
    intensities and where the prefix cache and BatchNorm files live."""
    parser.add_argument("--batchnorm", choices=("shipped", "public"), default=batchnorm,
                        help="BatchNorm statistics: the weights' own, or estimated on the "
                             "public val split at the run's size (stored in --batchnorm-dir; "
                             "the same recipe for pretrained and random init)")
    parser.add_argument("--intensity", choices=("binary", "tissue"), default=intensity,
                        help="masks as stored (air / +1000 HU) or as fat / soft tissue (the "
                             "dataset's '-tissue' variant)" + ("" if intensity else
                                                               "; default: the scenario's"))
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help="where the frozen prefix's activations are kept")
    parser.add_argument("--batchnorm-dir", type=Path, default=DEFAULT_BATCHNORM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench foundation-probe")
    parser.add_argument("--size", type=int, default=48, help="volume side in voxels")
    parser.add_argument("--init", choices=("pretrained", "random"), default="pretrained")
    parser.add_argument("--max-train", type=int, default=0, help="training volumes (0: all)")
    parser.add_argument("--prefix", choices=sorted(PREFIX_SPLITS), default="layer3-last6",
                        help="the LoRA preset whose frozen prefix is cached (and so warmed "
                             "for a federated run with that preset)")
    parser.add_argument("--warm-val", action="store_true",
                        help="also compute the val split's prefix (used by a public start)")
    add_setting_options(parser, batchnorm="public")
    parser.add_argument("--out", type=Path, default=None, help="append the result (JSON line)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.monotonic()
    data = setting_volumes(args.size, args.intensity)
    os.environ[ct_encoder.BATCHNORM_DIR_ENV] = str(args.batchnorm_dir)
    name = backbone_name(args.init, args.batchnorm, args.size, args.intensity, data["val"][0],
                         args.batchnorm_dir)
    classifier = build(name)
    classifier.cache_dir = args.cache_dir
    classifier.cache_bytes = 64 << 20  # disk is the cache here; memory holds a few batches
    train, train_labels = data["train"]
    if 0 < args.max_train < len(train):
        keep = np.sort(np.random.default_rng(0).permutation(len(train))[: args.max_train])
        train, train_labels = train[keep], train_labels[keep]
    test, test_labels = data["test"]
    split = PREFIX_SPLITS[args.prefix]
    train3, train4 = pooled_features(classifier, train, split=split)
    test3, test4 = pooled_features(classifier, test, split=split)
    if args.warm_val:  # the public start and BatchNorm split: warm its prefix too
        pooled_features(classifier, data["val"][0], split=split)
    result = {"backbone": name, "size": args.size, "init": args.init, "batchnorm": args.batchnorm,
              "intensity": args.intensity, "prefix": args.prefix, "train": len(train),
              "test": len(test),
              "prefix_misses": classifier.prefix_misses,
              "load_average": os.getloadavg()[0]}
    for name, (a, b) in {"layer3": (train3, test3), "layer4": (train4, test4)}.items():
        auc, c = probe_auc(a, train_labels, b, test_labels)
        result[f"{name} auc"], result[f"{name} C"] = round(auc, 4), c
    result["seconds"] = round(time.monotonic() - started)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(line + "\n")
    return 0
