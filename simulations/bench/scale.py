"""Many hospitals on one machine: wall time per round and peak memory for 5, 20 and 50 hospitals.

Every setting spreads the *same* training examples (IID) over its hospitals, all of which train
and evaluate each round, so the training work per round is the same and what grows with the
number of hospitals is the per-hospital overhead (messages, adapter copies, data slicing). Ray
keeps ``cores / cpus_per_hospital`` actors for the whole run; each builds the model once and
slices only the hospitals it serves.

``round time`` is the median over rounds 2.. (round 1 also starts the actors and builds their
models: reported apart). ``peak memory`` is the largest summed RSS of this process and all its
descendants (Ray's own processes and actors), sampled every 0.2 s; shared pages count once per
process, so it overstates what the machine needs.

    python -m simulations.bench scale                       # 5, 20, 50 hospitals, full data
    python -m simulations.bench scale --hospitals 5,20 --examples 800 --rounds 2   # quick
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
from pathlib import Path
from statistics import median

import psutil
from rich.console import Console

from simulations.config import load_config


class PeakMemory:
    """Samples the summed RSS (bytes) of this process tree in a thread; ``peak`` is the max."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass  # exited between listing and reading
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_setting(hospitals: int, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """One study with ``hospitals`` hospitals; its round times (s) and peak memory (MB)."""
    from simulations.runner import run_study

    config = load_config(None, {
        "seed": 0, "run_dir": str(out / f"hospitals-{hospitals}"), "baselines": [],
        "cpus_per_hospital": 1,
        "data": {"dataset": args.dataset, "num_hospitals": hospitals, "partition": "iid",
                 "max_train_examples": args.examples, "max_test_examples": args.test_examples},
        "model": {"image_size": args.image_size, "lora_r": 4, "lora_alpha": 8},
        "train": {"batch_size": args.batch_size, "local_epochs": 1},
        "federation": {"rounds": args.rounds, "min_hospitals": 2},
    })
    marks: list[float] = []
    start = time.monotonic()
    with PeakMemory() as memory:
        run_study(config, Console(quiet=True),
                  on_round=lambda r, _m: marks.append(time.monotonic()))
    # marks[0]: round 0's evaluation of the initial adapter; marks[k]: end of round k.
    rounds = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return {"hospitals": hospitals, "first_round_s": rounds[0],
            "round_s": median(rounds[1:]) if len(rounds) > 1 else rounds[0],
            "total_s": time.monotonic() - start, "peak_mb": memory.peak / 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench scale")
    parser.add_argument("--hospitals", default="5,20,50", help="comma-separated counts")
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--examples", type=int, default=0,
                        help="training examples shared by all hospitals (0: the whole split)")
    parser.add_argument("--test-examples", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="at least 2 (round 1 is start-up)")
    args = parser.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    counts = [int(c) for c in args.hospitals.split(",")]

    results = []
    with tempfile.TemporaryDirectory(prefix="medfed-scale-") as tmp:
        for hospitals in counts:
            result = run_setting(hospitals, args, Path(tmp))
            results.append(result)
            print(f"{hospitals:3d} hospitals: round {result['round_s']:6.2f} s "
                  f"(first round {result['first_round_s']:6.2f} s, whole run "
                  f"{result['total_s']:6.1f} s), peak memory {result['peak_mb']:7.0f} MB",
                  flush=True)
    print(f"{'hospitals':>9} {'round s':>8} {'first s':>8} {'peak MB':>8}")
    for r in results:
        print(f"{r['hospitals']:9d} {r['round_s']:8.2f} {r['first_round_s']:8.2f} "
              f"{r['peak_mb']:8.0f}")
    first, last = results[0], results[-1]
    print(f"round time {last['hospitals']}/{first['hospitals']} hospitals: "
          f"{last['round_s'] / first['round_s']:.2f}")
    return 0
