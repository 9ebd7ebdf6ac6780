"""DP-SGD step time over the non-private step time, on the default backbone with LoRA.

One optimiser step = forward, backward, (per-example clipping and noise,) AdamW update, on a fixed
batch of random images: the same work a hospital does per step, without data loading. Each opacus
per-example gradient engine is timed against the same model without DP. The last line is the
ratio of the run's engine (``DPConfig().dp_grad_sample_mode``, ``einsum``: opacus' hooks engine
with ``privacy.grad_samplers``' exact Conv2d sampler) at the largest setting:
``dp/non-dp step time: <number>``; ``functorch`` (also exact), ``hooks`` and ``ghost`` (wrong on
this channels-last backbone and refused by DP-SGD training, see ``privacy.config``) can be timed
for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from models.config import ModelConfig
from models.lora import build_lora_model, freeze_batchnorm
from privacy.config import GRAD_SAMPLE_MODES, DPConfig
from privacy.grad_samplers import LAYOUT_UNSAFE_MODES, engine_module


def _setting(text: str) -> tuple[int, int]:
    size, batch = text.lower().split("x")
    return int(size), int(batch)


def make_step(config: ModelConfig, batch: int, mode: str | None) -> Callable[[], None]:
    """One optimiser step on a fixed batch; ``mode`` None is non-private, else an engine among
    ``GRAD_SAMPLE_MODES``."""
    torch.manual_seed(0)
    model = build_lora_model(config, verify=False)
    images = torch.rand(batch, 1, config.image_size, config.image_size)
    labels = torch.randint(0, config.num_classes, (batch,))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    if mode is not None:
        loader = DataLoader(TensorDataset(images, labels), batch_size=batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode in LAYOUT_UNSAFE_MODES:  # timed for comparison; training refuses them here
                opacus_mode = mode
            else:
                model, opacus_mode = engine_module(model, mode)
            made = PrivacyEngine().make_private(
                module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
                noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
                grad_sample_mode=opacus_mode,
            )
        model, optimizer = made[0], made[1]
        if mode == "ghost":
            criterion = made[2]
    model.train()
    freeze_batchnorm(model)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(images), labels) if mode else F.cross_entropy(model(images),
                                                                              labels)
        loss.backward()
        optimizer.step()

    return step


def interleaved_times(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per step of each callable, timed in turns (A B C A B C ...) after one
    warm-up each, so that load from other processes hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in steps.values():
            step()
        for _ in range(repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench dp-overhead")
    parser.add_argument("--settings", default="64x32,96x256",
                        help="comma-separated <image px>x<batch> settings (default 64x32,96x256)")
    parser.add_argument("--modes", default=DPConfig().dp_grad_sample_mode,
                        help=f"comma-separated engines among {','.join(GRAD_SAMPLE_MODES)} "
                             "(default: the configured one)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per engine")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(GRAD_SAMPLE_MODES))
    if unknown:
        parser.error(f"unknown --modes {unknown}; choose from {GRAD_SAMPLE_MODES}")
    ratio = float("nan")
    print(f"backbone {ModelConfig.backbone}, LoRA r={args.lora_r}, {args.threads} threads, "
          f"median of {args.steps} interleaved steps")
    for text in args.settings.split(","):
        size, batch = _setting(text)
        config = ModelConfig(image_size=size, lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
        steps = {"non-private": make_step(config, batch, None)}
        steps |= {mode: make_step(config, batch, mode) for mode in modes}
        times = interleaved_times(steps, args.steps)
        base = times.pop("non-private")
        print(f"{size} px, batch {batch}: non-private {base * 1000:.0f} ms/step")
        for mode, seconds in times.items():
            print(f"  DP-SGD ({mode}): {seconds * 1000:.0f} ms/step, {seconds / base:.2f}x")
        engine = DPConfig().dp_grad_sample_mode
        ratio = times.get(engine, min(times.values())) / base
    print(f"dp/non-dp step time: {ratio:.2f}")
    return 0
