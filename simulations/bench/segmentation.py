"""``python -m simulations.bench segmentation``: LiteMedSAM federated on real MRI (hippocampus).

A fixed split by case (seeded): test, validation and training cases; the training cases are
shared among hospitals with size skew (:func:`case_counts`: power law, as
``simulations.partition``'s).
Each training case contributes ``--slices-per-case`` slices that hold hippocampus (evenly
spaced); validation and test cases contribute every ``--eval-stride``-th slice holding
hippocampus, and are scored by 3D Dice over those slices (the two labels merged into one
structure; stride 2 halves the encoder's work and estimates the volume's Dice from half its
slices). The image encoder runs
once per slice (embeddings cached on disk, ``--cache-dir``).

Compared, all on the test cases, each at the round with the best validation Dice:

- ``pretrained zero-shot``: LiteMedSAM as published, tight box from the true mask;
- ``federated``: LoRA on the mask decoder, FedAvg over the hospitals, tight (jittered) boxes;
- ``federated automatic``: the same but the whole slice is the box, in training and test;
- ``pooled``: the same LoRA trained on all training slices together, same steps in total;
- ``unet federated``: a 2D U-Net from scratch, same slices, rounds and FedAvg.

The federation is an in-process FedAvg loop over the hospitals' adapter tensors (weighted by
their slice counts), not Flower: the Flower-wired version is a later step. The automatic and
U-Net rows are told which slices hold the structure (as the box row is); a pipeline that also
has to find those slices would score lower.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel

from imaging.segmentation import SPLITS, SegmentationCase, foreground_slices, load_cases
from models import litemedsam
from models.adapters import adapter_nbytes, adapter_state, load_adapter_state
from models.segmentation import (
    SliceSet,
    build_segmenter,
    embedding_cache,
    make_slice_set,
    predict_masks,
    train_segmenter,
    volume_dice,
)
from models.unet_segmentation import (
    build_unet,
    pad_slices,
    predict_unet,
    train_unet,
    unet_targets,
)
from simulations.datasets import search_dirs

logger = logging.getLogger(__name__)

CLASSES = (0, 1, 2)
State = dict[str, torch.Tensor]


def hippocampus_dir() -> Path:
    """The MSD hippocampus folder (``images/``, ``labels/``) under the shared data folders."""
    for folder in search_dirs():
        if (folder / "hippocampus" / "images").is_dir():
            return folder / "hippocampus"
    raise FileNotFoundError("no hippocampus/ in " + ", ".join(map(str, search_dirs())))


def write_manifest(folder: Path, data: Path, splits: dict[str, list[str]]) -> Path:
    """A segmentation manifest of the chosen case ids (absolute paths)."""
    lines = ["image,mask,patient_id,split"]
    for split, ids in splits.items():
        lines += [f"{data / 'images' / f'hippocampus_{i}.nii.gz'},"
                  f"{data / 'labels' / f'hippocampus_{i}.nii.gz'},{i},{split}" for i in ids]
    path = folder / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def split_cases(data: Path, sizes: dict[str, int], seed: int) -> dict[str, list[str]]:
    """Case ids per split, drawn by a seeded permutation of the cases that have both files."""
    ids = sorted(p.name[len("hippocampus_"):-len(".nii.gz")]
                 for p in (data / "labels").glob("hippocampus_*.nii.gz")
                 if (data / "images" / p.name).is_file())
    order = np.random.default_rng(seed).permutation(ids).tolist()
    out, start = {}, 0
    for split in ("test", "val", "train"):
        out[split] = sorted(order[start : start + sizes[split]])
        start += sizes[split]
    return out


def case_slices(case: SegmentationCase, count: int | None,
                stride: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A case's slices holding foreground (``count`` evenly spaced ones, or every ``stride``-th):
    images in [0, 1] and merged boolean masks, each ``(H, W)``."""
    index = foreground_slices(case.mask)[::stride]
    if count is not None and count < len(index):
        index = index[np.linspace(0, len(index) - 1, count).round().astype(int)]
    images = [torch.from_numpy(case.image[k].copy()) for k in index]
    masks = [torch.from_numpy(case.mask[k] > 0) for k in index]
    return images, masks


@dataclass
class Split:
    """One split's slices: embedded for LiteMedSAM, raw for the U-Net."""

    sam: SliceSet
    images: list[torch.Tensor] = field(default_factory=list)


def build_split(model: litemedsam.LiteMedSAM, cases: list[SegmentationCase],
                count: int | None, cache, stride: int = 1) -> Split:
    """Slices of ``cases`` (case index = position in ``cases``), embedded through ``cache``."""
    images, masks, owners = [], [], []
    for k, case in enumerate(cases):
        i, m = case_slices(case, count, stride)
        images += i
        masks += m
        owners += [k] * len(i)
    return Split(make_slice_set(model, images, masks, owners, cache), images)


def fedavg(states: list[State], weights: list[int]) -> State:
    """Weighted mean of state dicts (same keys and shapes)."""
    total = float(sum(weights))
    return {k: sum(s[k].float() * (w / total) for s, w in zip(states, weights, strict=True))
            for k in states[0]}


@dataclass
class Federation:
    """How a federated (or pooled) run trains: rounds, local epochs, batch size, seed."""

    rounds: int
    local_epochs: int
    batch_size: int
    seed: int

    def steps(self, count: int) -> int:
        """Local optimiser steps for ``count`` slices."""
        return self.local_epochs * -(-count // self.batch_size)


@dataclass
class RunResult:
    """Best-validation round's state, its validation Dice, and the time of each round (s)."""

    state: State
    val_dice: float
    round_seconds: list[float]
    history: list[float]


def federate(parts: list[torch.Tensor], plan: Federation, start: State,
             train: Callable[[State, torch.Tensor, int, int], State],
             score: Callable[[State], float]) -> RunResult:
    """FedAvg: each round every hospital trains from the global state on its slices (``train``:
    state, slice index, steps, seed -> new state), the coordinator averages them weighted by
    slice count, then ``score`` gives the new global state's validation Dice."""
    state, best, seconds, history = start, (start, -1.0), [], []
    for r in range(plan.rounds):
        began = time.monotonic()
        states = [train(state, part, plan.steps(len(part)), plan.seed * 1000 + r * 100 + h)
                  for h, part in enumerate(parts)]
        state = fedavg(states, [len(p) for p in parts])
        seconds.append(time.monotonic() - began)
        history.append(score(state))
        logger.info("round %d/%d: validation Dice %.4f (%.1f s)", r + 1, plan.rounds,
                    history[-1], seconds[-1])
        if history[-1] > best[1]:
            best = (state, history[-1])
    return RunResult(best[0], best[1], seconds, history)


def lora_runner(model: PeftModel, train_set: SliceSet, val_set: SliceSet, lr: float,
                mode: str, batch_size: int) -> tuple[Callable, Callable]:
    """``train`` and ``score`` closures of :func:`federate` for LiteMedSAM's LoRA adapter."""

    def train(state: State, index: torch.Tensor, steps: int, seed: int) -> State:
        load_adapter_state(model, state)
        train_segmenter(model, train_set.subset(index), steps, batch_size=batch_size, lr=lr,
                        seed=seed, mode=mode)
        return dict(adapter_state(model))

    def score(state: State) -> float:
        load_adapter_state(model, state)
        return float(np.mean(test_dice(model, val_set, mode)))

    return train, score


def test_dice(model: PeftModel | litemedsam.LiteMedSAM, data: SliceSet, mode: str) -> list[float]:
    """3D Dice per case of LiteMedSAM's masks under ``mode`` prompts."""
    return volume_dice(predict_masks(model, data, mode), data.masks, data.cases)


def unet_runner(train_split: Split, val_split: Split, lr: float,
                batch_size: int) -> tuple[Callable, Callable, torch.nn.Module]:
    """``train`` and ``score`` closures of :func:`federate` for the U-Net (all its weights)."""
    net = build_unet()
    images = pad_slices(train_split.images)
    targets = unet_targets(train_split.sam.masks)

    def train(state: State, index: torch.Tensor, steps: int, seed: int) -> State:
        net.load_state_dict(state)
        train_unet(net, images[index], targets[index], steps, batch_size, lr, seed)
        return {k: v.detach().clone() for k, v in net.state_dict().items()}

    def score(state: State) -> float:
        net.load_state_dict(state)
        return float(np.mean(unet_dice(net, val_split)))

    return train, score, net


def unet_dice(net: torch.nn.Module, split: Split) -> list[float]:
    """3D Dice per case of the U-Net's masks."""
    return volume_dice(predict_unet(net, split.images), split.sam.masks, split.sam.cases)


def case_counts(num_cases: int, hospitals: int) -> list[int]:
    """Cases per hospital under power-law size skew: the k-th hospital's share is proportional
    to ``1 / (k + 1)`` (``simulations.partition``'s ``powerlaw`` at skew 1), at least one case
    each (that module's 20-example floor does not fit a few volumes)."""
    if num_cases < hospitals:
        raise ValueError(f"{num_cases} training cases cannot give {hospitals} hospitals one each")
    weights = 1.0 / np.arange(1, hospitals + 1)
    counts = 1 + np.floor(weights / weights.sum() * (num_cases - hospitals)).astype(int)
    for k in range(num_cases - int(counts.sum())):
        counts[k % hospitals] += 1
    return counts.tolist()


def hospital_parts(train_cases: torch.Tensor, num_cases: int, hospitals: int,
                   seed: int) -> list[torch.Tensor]:
    """Slice indices per hospital: the training cases dealt in a seeded order by
    :func:`case_counts`, each hospital holding all slices of its cases."""
    order = np.random.default_rng(seed).permutation(num_cases)
    bounds = np.cumsum([0, *case_counts(num_cases, hospitals)])
    return [torch.cat([(train_cases == int(c)).nonzero().flatten()
                       for c in order[a:b]]) for a, b in zip(bounds, bounds[1:], strict=False)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench segmentation",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--train-cases", type=int, default=10)
    parser.add_argument("--val-cases", type=int, default=2)
    parser.add_argument("--test-cases", type=int, default=3)
    parser.add_argument("--eval-stride", type=int, default=2,
                        help="score every n-th slice holding foreground of val/test volumes")
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--slices-per-case", type=int, default=3,
                        help="training slices per training case (evenly spaced)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3, help="LoRA learning rate (AdamW)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,out_proj",
                        help="mask-decoder Linear names LoRA wraps (comma-separated)")
    parser.add_argument("--unet-lr", type=float, default=3e-3)
    parser.add_argument("--unet-local-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path,
                        default=Path.home() / ".cache" / "medfed" / "litemedsam-embeddings",
                        help="image embeddings on disk (derived from patient images)")
    parser.add_argument("--embed-only", action="store_true",
                        help="only compute (and cache) the embeddings, then stop")
    parser.add_argument("--skip", default="",
                        help="rows to skip, comma-separated: zero-shot, federated, "
                        "automatic, pooled, unet (to run rows in separate processes)")
    return parser.parse_args(argv)


def load_splits(args: argparse.Namespace, model: litemedsam.LiteMedSAM, cache) -> dict[str, Split]:
    """Read the chosen cases through a manifest and embed their slices (cached)."""
    data = hippocampus_dir()
    ids = split_cases(data, {"train": args.train_cases, "val": args.val_cases,
                             "test": args.test_cases}, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        cases, problems = load_cases(write_manifest(Path(folder), data, ids), CLASSES,
                                     roots=(data,))
    if problems:
        raise RuntimeError(f"{len(problems)} unusable case(s): {problems[0]}")
    began = time.monotonic()
    splits = {split: build_split(model, [c for c in cases if c.split == split],
                                 args.slices_per_case if split == "train" else None, cache,
                                 1 if split == "train" else args.eval_stride)
              for split in SPLITS}
    spent = time.monotonic() - began
    logger.info("slices train/val/test: %s; encoder ran on %d, %d from the cache (%.1f s, "
                "%d threads)", "/".join(str(len(splits[s].sam)) for s in SPLITS),
                cache.misses, cache.hits, spent, torch.get_num_threads())
    return splits


def run_lora(args: argparse.Namespace, splits: dict[str, Split], parts: list[torch.Tensor],
             mode: str) -> tuple[RunResult, PeftModel]:
    """A LoRA run (federated when ``parts`` has several hospitals, pooled with one)."""
    model = build_segmenter(rank=args.rank, alpha=2 * args.rank,
                            targets=tuple(args.targets.split(",")))
    plan = Federation(args.rounds, args.local_epochs, args.batch_size, args.seed)
    train, score = lora_runner(model, splits["train"].sam, splits["val"].sam, args.lr, mode,
                               args.batch_size)
    result = federate(parts, plan, dict(adapter_state(model)), train, score)
    load_adapter_state(model, result.state)
    return result, model


def run_unet(args: argparse.Namespace, splits: dict[str, Split],
             parts: list[torch.Tensor]) -> float:
    """Federated U-Net from scratch: mean test Dice at its best validation round."""
    plan = Federation(args.rounds, args.unet_local_epochs, args.batch_size, args.seed)
    train, score, net = unet_runner(splits["train"], splits["val"], args.unet_lr,
                                    args.batch_size)
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}
    result = federate(parts, plan, start, train, score)
    net.load_state_dict(result.state)
    logger.info("unet validation Dice by round: %s", [round(d, 4) for d in result.history])
    return float(np.mean(unet_dice(net, splits["test"])))


def _report(name: str, result: RunResult, model: PeftModel, test: SliceSet, mode: str) -> float:
    dice = float(np.mean(test_dice(model, test, mode)))
    logger.info("%s: validation Dice by round %s; test Dice %.4f", name,
                [round(d, 4) for d in result.history], dice)
    return dice


def _rows(args: argparse.Namespace, splits: dict[str, Split], parts: list[torch.Tensor],
          base: litemedsam.LiteMedSAM, skip: set[str]) -> dict[str, float]:
    """The Dice rows that are not skipped, and the federated run's median round time."""
    test = splits["test"].sam
    lines: dict[str, float] = {}
    if "zero-shot" not in skip:
        lines["pretrained zero-shot dice"] = float(np.mean(test_dice(base, test, "tight")))
    if "federated" not in skip:
        fed, model = run_lora(args, splits, parts, "tight")
        lines["federated dice"] = _report("federated", fed, model, test, "tight")
        lines["seconds per round"] = float(np.median(fed.round_seconds))
    if "automatic" not in skip:
        auto, auto_model = run_lora(args, splits, parts, "whole")
        lines["federated automatic dice"] = _report("automatic", auto, auto_model, test, "whole")
    if "pooled" not in skip:
        pooled, pooled_model = run_lora(args, splits, [torch.arange(len(splits["train"].sam))],
                                        "tight")
        lines["pooled dice"] = _report("pooled", pooled, pooled_model, test, "tight")
    if "unet" not in skip:
        lines["unet federated dice"] = run_unet(args, splits, parts)
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    base = litemedsam.build_litemedsam()
    splits = load_splits(args, base, embedding_cache(args.cache_dir))
    if args.embed_only:
        return 0
    parts = hospital_parts(splits["train"].sam.cases, args.train_cases, args.hospitals,
                           args.seed)
    logger.info("training slices per hospital: %s", [len(p) for p in parts])
    lines = _rows(args, splits, parts, base, set(filter(None, args.skip.split(","))))
    adapter = adapter_nbytes(adapter_state(build_segmenter(
        rank=args.rank, alpha=2 * args.rank, targets=tuple(args.targets.split(",")))))
    full = sum(v.numel() * v.element_size() for v in base.state_dict().values())
    lines["full/adapter bytes"] = full / adapter
    logger.info("adapter %d bytes, full model %d bytes", adapter, full)
    order = ["pretrained zero-shot dice", "federated dice", "federated automatic dice",
             "pooled dice", "unet federated dice", "full/adapter bytes", "seconds per round"]
    for name in (n for n in order if n in lines):
        print(f"{name}: {lines[name]:.4f}" if "dice" in name else f"{name}: {lines[name]:.1f}")
    return 0
