"""Head-only DP-SGD of the default 2D study, replayed on fixed features: choices cheaply.

Under the centred-head recipe (``dp-utility --public-start F --dp-trainable head``) the whole
network before the head is fixed at the public start (the LoRA factors do not train, BatchNorm
runs on its frozen statistics), so a federation of head-only DP-SGD is a federation of DP
logistic regression on fixed features. This replays it that way: every hospital's pooled
features are computed once at the public start, then each round each hospital runs opacus'
recipe written out in torch (Poisson batches at ``q = 1 / ceil(n / batch)``, per-example
gradients of the cross-entropy clipped to ``C`` (logit adjustment off, as under DP-SGD),
Gaussian noise ``z C`` with ``z`` from ``privacy.accounting.noise_for_target`` for the whole
run, divided by the expected batch size, SGD with momentum, dropout 0.2 before the head as
in training), and the
coordinator averages the heads by example counts. The round published is the one with the
best combined validation AUC (all hospitals' validation examples together), as a run does.

It is a replay, not the product: the noise comes from a seeded generator (a hospital's comes
from a CSPRNG), and the published figures come from ``dp-utility`` runs of the real federation.
What it is for: comparing settings on validation in seconds per run, where a real run costs
minutes. ``--validation-only`` prints no test figure.

Usage::

    python -m simulations.bench dp-head-replay --public-start 0.5 --lrs 0.05,0.1,0.2 \\
        --clips 0.5,1 --epsilons 8,2 --draws 3 --validation-only
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from models.adapters import load_adapter_file
from models.data import ImageSet
from models.lora import build_lora_model
from privacy.accounting import noise_for_target
from privacy.membership import loss_threshold_attack, matched_non_members
from simulations.config import SimulationConfig, load_config
from simulations.public_start import PublicStartConfig, public_split, train_public_start
from simulations.sites import cached_dataset, hospital_sites

logger = logging.getLogger(__name__)

DROPOUT = 0.2
"""EfficientNet-Lite0's dropout before the head (``models.efficientnet_lite``)."""


@dataclass(frozen=True)
class Features:
    """Pooled features (already centred) at the public start, and the start's head."""

    train: list[ImageSet]
    val: list[ImageSet]
    test: ImageSet
    unseen: ImageSet
    weight: torch.Tensor
    bias: torch.Tensor


@dataclass(frozen=True)
class Setting:
    """One replayed federation: epsilon per hospital (None: no DP, no clipping), SGD lr,
    momentum, clip bound, expected batch, local epochs, rounds."""

    epsilon: float | None
    lr: float
    momentum: float
    clip: float
    batch_size: int
    local_epochs: int
    rounds: int


@cache
def _noise(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """``noise_for_target`` with the PRV accountant, once per setting (bisection is slow)."""
    return noise_for_target(epsilon, delta, sample_rate, steps, "prv")


def _pooled(model, data: ImageSet, batch_size: int = 256) -> ImageSet:
    """``data`` with each image replaced by its centred pooled feature (the head's input),
    shaped ``(N, F, 1, 1)`` so that it stays an ImageSet."""
    base = model.get_base_model()
    model.eval()
    with torch.no_grad():
        out = [base.centre(base.pooled(data.images[i:i + batch_size]))
               for i in range(0, len(data), batch_size)]
    return ImageSet(torch.cat(out).double()[:, :, None, None], data.labels)  # (N, F, 1, 1)


def features(config: SimulationConfig, start: Path, fraction: float) -> Features:
    """Every split's centred features under the public start's adapter ``start``."""
    model = build_lora_model(config.model, verify=False)
    load_adapter_file(model, start)
    sites = hospital_sites(config.data, config.model.image_size, config.seed)
    _, unseen = public_split(config.data.dataset, config.model.image_size, fraction, config.seed)
    test = cached_dataset(config.data.dataset, config.model.image_size).splits["test"]
    head = model.get_base_model().net._fc
    return Features(train=[_pooled(model, s.train) for s in sites],
                    val=[_pooled(model, s.val) for s in sites], test=_pooled(model, test),
                    unseen=_pooled(model, unseen), weight=head.weight.detach().double(),
                    bias=head.bias.detach().double())


def _example_grads(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                   shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example gradients of the cross-entropy on logits shifted by ``shift`` (logit
    adjustment; zeros under DP): ``(B, K, F)``, ``(B, K)``."""
    err = torch.softmax(x @ w.T + b + shift, dim=1) - F.one_hot(y, w.shape[0]).double()
    return err[:, :, None] * x[:, None, :], err


def _local(w: torch.Tensor, b: torch.Tensor, data: ImageSet, s: Setting, rounds_noise: float,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One hospital's round of (DP-)SGD on its features from the global head ``(w, b)``."""
    w, b = w.clone(), b.clone()
    counts = torch.bincount(data.labels, minlength=w.shape[0]).double()
    shift = torch.log((counts + 1.0) / (counts.sum() + w.shape[0]))
    if s.epsilon is not None:  # off under DP-SGD: the prior is private (docs/privacy.md)
        shift = torch.zeros_like(shift)
    n = len(data)
    batches = math.ceil(n / s.batch_size)
    velocity = [torch.zeros_like(w), torch.zeros_like(b)]
    for _ in range(s.local_epochs * batches):
        pick = torch.nonzero(torch.rand(n, generator=gen) < 1.0 / batches).view(-1)
        x, y = data.images[pick].flatten(1), data.labels[pick]
        keep = (torch.rand(x.shape, generator=gen, dtype=x.dtype) >= DROPOUT) / (1 - DROPOUT)
        gw, gb = _example_grads(w, b, x * keep, y, shift)
        if s.epsilon is None:
            grads = [gw.sum(0), gb.sum(0)]
        else:
            norms = (gw.flatten(1).pow(2).sum(1) + gb.pow(2).sum(1)).sqrt()
            factor = (s.clip / (norms + 1e-6)).clamp(max=1.0)
            grads = [(g * factor.view(-1, *[1] * (g.dim() - 1))).sum(0) for g in (gw, gb)]
            grads = [g + rounds_noise * s.clip * torch.randn(g.shape, generator=gen,
                                                               dtype=g.dtype) for g in grads]
        scale = n / batches if s.epsilon is not None else max(len(pick), 1)
        for param, buf, grad in zip((w, b), velocity, grads, strict=True):
            buf.mul_(s.momentum).add_(grad / scale)
            param.sub_(s.lr * buf)
    return w, b


def _auc(w: torch.Tensor, b: torch.Tensor, data: ImageSet) -> float:
    """AUC of the class-1 probability (binary tasks)."""
    scores = torch.softmax(data.images.flatten(1) @ w.T + b, dim=1)[:, 1]
    return float(roc_auc_score(data.labels.numpy(), scores.numpy()))


def replay(feats: Features, s: Setting, config: SimulationConfig,
           gen: torch.Generator) -> dict[str, object]:
    """One replayed federation: validation and test AUC per round, the published round (best
    combined validation AUC) and its head."""
    noise = 0.0
    val = ImageSet.concat(feats.val)
    w, b = feats.weight, feats.bias
    rows = []
    for _ in range(s.rounds):
        heads, sizes = [], []
        for data in feats.train:
            if s.epsilon is not None:
                batches = math.ceil(len(data) / s.batch_size)
                noise = _noise(s.epsilon, config.privacy.dp_delta, 1.0 / batches,
                               s.local_epochs * batches * s.rounds)
            heads.append(_local(w, b, data, s, noise, gen))
            sizes.append(len(data))
        total = float(sum(sizes))
        w = sum(h[0] * (k / total) for h, k in zip(heads, sizes, strict=True))
        b = sum(h[1] * (k / total) for h, k in zip(heads, sizes, strict=True))
        rows.append({"val": _auc(w, b, val), "test": _auc(w, b, feats.test), "head": (w, b)})
    best = max(range(len(rows)), key=lambda r: rows[r]["val"])
    return {"val": rows[best]["val"], "test": rows[best]["test"], "round": best + 1,
            "head": rows[best]["head"], "per_round": [r["val"] for r in rows]}


def membership_auc(feats: Features, head: tuple[torch.Tensor, torch.Tensor], seed: int,
                   limit: int = 500) -> float:
    """Loss-threshold attack AUC of a replayed head: hospitals' training examples against the
    unseen rest of ``val`` (matched label counts)."""
    linear = torch.nn.Linear(head[0].shape[1], head[0].shape[0]).double()
    with torch.no_grad():
        linear.weight.copy_(head[0])
        linear.bias.copy_(head[1])
    members, others = matched_non_members(ImageSet.concat(feats.train), feats.unseen, seed, limit)
    return loss_threshold_attack(torch.nn.Sequential(torch.nn.Flatten(), linear), members,
                                 others).auc


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench dp-head-replay")
    parser.add_argument("--public-start", type=float, default=0.5, metavar="FRACTION")
    parser.add_argument("--epsilons", default="8,2", help="0 in the list: no DP")
    parser.add_argument("--lrs", default="0.1")
    parser.add_argument("--clips", default="1")
    parser.add_argument("--batch-sizes", default="64")
    parser.add_argument("--rounds", default="4")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--mia", action="store_true", help="attack each DP head too")
    parser.add_argument("--validation-only", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, required=True,
                        help="holds (or receives) the public start and the features")
    return parser


def _load_features(args: argparse.Namespace, config: SimulationConfig) -> Features:
    """The features, cached in ``<run-dir>/replay-features.pt``; trains the public start when
    ``<run-dir>/public-start`` has none."""
    cache = args.run_dir / f"replay-features-{args.public_start:g}-{args.seed}.pt"
    if cache.exists():
        return Features(**torch.load(cache, weights_only=False))
    start = args.run_dir / "public-start" / "adapter"
    if not start.exists():
        train_public_start(PublicStartConfig(dataset=config.data.dataset,
                                             fraction=args.public_start, seed=args.seed),
                           config.model, args.run_dir / "public-start")
    feats = features(config, start, args.public_start)
    torch.save(vars(feats), cache)
    return feats


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = load_config(None, {"seed": args.seed})
    feats = _load_features(args, config)
    grid = itertools.product(_floats(args.epsilons), _floats(args.lrs), _floats(args.clips),
                             _floats(args.batch_sizes), _floats(args.rounds))
    key = "val" if args.validation_only else "test"
    print(f"replayed head-only federation, {len(feats.train)} hospitals, momentum "
          f"{args.momentum:g}, {args.local_epochs} local epochs, {args.draws} draw(s); {key} auc")
    for eps, lr, clip, batch, rounds in grid:
        s = Setting(eps or None, lr, args.momentum, clip, int(batch), args.local_epochs,
                    int(rounds))
        results = [replay(feats, s, config, torch.Generator().manual_seed(args.seed * 100 + d))
                   for d in range(args.draws)]
        values = [r[key] for r in results]
        mia = ([membership_auc(feats, r["head"], args.seed) for r in results]
               if args.mia else [])
        print(f"  eps {eps:g} lr {lr:g} clip {clip:g} batch {int(batch)} rounds {int(rounds)}: "
              f"{np.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})  rounds published "
              f"{[r['round'] for r in results]}  val per round "
              f"{' '.join(f'{v:.4f}' for v in np.mean([r['per_round'] for r in results], 0))}"
              + (f"  attack auc {np.mean(mia):.3f}" if mia else ""), flush=True)
    return 0
