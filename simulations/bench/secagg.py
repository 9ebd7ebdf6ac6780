"""What secure aggregation costs: the same rounds with and without SecAgg+, 5 and 10 hospitals.

Each setting runs the same study (same data, seed, rounds) twice on Flower's simulation engine:
plain, then with ``federation.secure_aggregation.enabled``. ``round time`` is the median over
rounds 2.. (round 1 also starts Ray's actors); ``bytes`` is what each hospital uploads per
round: the adapter tensors (plain), or the masked vector plus its public keys, encrypted shares
and unmasking shares over the five stages (secure).

    python -m simulations.bench secagg                          # 5 and 10 hospitals
    python -m simulations.bench secagg --hospitals 5 --rounds 2 --examples 500   # quick
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from simulations.bench.timing import steady_round_s, timed_study
from simulations.config import load_config


def run_setting(hospitals: int, secure: bool, args: argparse.Namespace, out: Path
                ) -> dict[str, float]:
    """One study; its median round time (s), bytes per hospital per round and test AUC."""
    name = f"{'secure' if secure else 'plain'}-{hospitals}"
    config = load_config(None, {
        "seed": 0, "run_dir": str(out / name), "baselines": [], "cpus_per_hospital": 1,
        "data": {"dataset": args.dataset, "num_hospitals": hospitals, "partition": "iid",
                 "max_train_examples": args.examples, "max_test_examples": args.test_examples},
        "model": {"image_size": args.image_size},
        # The settings its figures in docs/benchmarks.md were measured with.
        "train": {"batch_size": 16, "local_epochs": 1, "lr": 1e-3},
        "federation": {"rounds": args.rounds, "min_hospitals": 2,
                       "secure_aggregation": {"enabled": secure}},
    })
    summary, rounds = timed_study(config)
    return {"round_s": steady_round_s(rounds),
            "bytes": summary["bytes"]["upload_per_hospital_per_round"],
            "auc": summary["federated"]["auc"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench secagg")
    parser.add_argument("--hospitals", default="5,10", help="comma-separated counts")
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--examples", type=int, default=2000,
                        help="training examples shared by all hospitals (0: the whole split)")
    parser.add_argument("--test-examples", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="at least 2 (round 1 is start-up)")
    args = parser.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    counts = [int(c) for c in args.hospitals.split(",")]

    rows = []
    with tempfile.TemporaryDirectory(prefix="medfed-secagg-") as tmp:
        for hospitals in counts:
            plain = run_setting(hospitals, False, args, Path(tmp))
            secure = run_setting(hospitals, True, args, Path(tmp))
            rows.append((hospitals, plain, secure))
            print(f"{hospitals:3d} hospitals: plain {plain['round_s']:6.2f} s/round "
                  f"{plain['bytes']:10,.0f} B, secure {secure['round_s']:6.2f} s/round "
                  f"{secure['bytes']:10,.0f} B", flush=True)
    print(f"{'hospitals':>9} {'mode':>7} {'round s':>8} {'bytes/hosp/round':>17} {'test auc':>9}")
    for hospitals, plain, secure in rows:
        for mode, r in (("plain", plain), ("secagg", secure)):
            print(f"{hospitals:9d} {mode:>7} {r['round_s']:8.2f} {r['bytes']:17,.0f} "
                  f"{r['auc']:9.4f}")
    hospitals, plain, secure = rows[-1]
    print(f"secagg/plain bytes per hospital ({hospitals} hospitals): "
          f"{secure['bytes'] / plain['bytes']:.3f}")
    print(f"secagg/plain round time ({hospitals} hospitals): "
          f"{secure['round_s'] / plain['round_s']:.2f}")
    return 0
