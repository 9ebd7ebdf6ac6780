"""Every aggregation rule on the same federated PneumoniaMNIST split, same rounds and budget.

Runs each strategy through the Flower simulation (``simulations.runner.run_study``), with the
pooled and local baselines once on the same split, and prints a table of final test AUC,
accuracy and bytes uploaded per hospital per round. For ``fedsa-lora`` the test metrics are the
shared part's (B at its initial value); the ``val auc`` / ``val acc`` columns are the means of
the hospitals' last-round validation metrics, for ``fedsa-lora`` their personalised adapters'.
Then a scenario with one hospital sending a distorted update (sign-flipped and scaled) shows which
rules survive it. Ends with ``best federated auc - pooled auc: <number>``.

The defaults are the full setting: 64 px, every training and test image, 5
hospitals, Dirichlet 0.3, 4 rounds of one local epoch at batch 16 and lr 1e-3 for every rule
(``hetlora``: ranks 2, 4, 8 cycled over the hospitals). ``--image-size 32 --max-train 800
--max-test 300 --local-steps 8`` is the quick setting.
"""

from __future__ import annotations

import argparse
import csv
import logging
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from rich.console import Console

from simulations import runner
from simulations.attack import UpdateAttack, attacked_client_app
from simulations.config import load_config
from strategies import STRATEGIES

ROBUST = ["fedavg", "median", "trimmed-mean", "norm-bound"]


def _overrides(args: argparse.Namespace, strategy: str, baselines: list[str],
               run_dir: Path) -> dict[str, Any]:
    return {
        "seed": args.seed,
        "run_dir": str(run_dir),
        "baselines": baselines,
        "data": {"dataset": "pneumoniamnist", "num_hospitals": args.hospitals,
                 "partition": "dirichlet", "alpha": args.alpha,
                 "max_train_examples": args.max_train, "max_test_examples": args.max_test},
        "model": {"image_size": args.image_size},
        "train": {"local_epochs": args.local_epochs, "local_steps": args.local_steps,
                  "batch_size": args.batch_size, "lr": args.lr},
        "federation": {"rounds": args.rounds, "strategy": strategy,
                       "min_hospitals": args.hospitals - 1}
        | ({"options": {"hetlora_ranks": _ranks(args)}} if strategy == "hetlora" else {}),
    }


def _ranks(args: argparse.Namespace) -> list[int]:
    return [int(r) for r in args.hetlora_ranks.split(",") if r]


def _last_round_val(run_dir: Path, rounds: int, metric: str) -> float:
    """Mean over hospitals of a last-round validation metric (a label-skewed hospital's
    one-class validation split has no AUC: nan, left out of the mean)."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        values = [float(r[metric]) for r in csv.DictReader(handle)
                  if r["round"] == str(rounds) and r["hospital"] != "global" and r[metric]]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _run(args, strategy: str, baselines: list[str], root: Path,
         attack: UpdateAttack | None = None) -> dict[str, Any]:
    tag = f"{strategy}-attack{attack.factor:g}" if attack else strategy
    run_dir = root / tag
    config = load_config(args.config, _overrides(args, strategy, baselines, run_dir))
    console = Console(quiet=True)
    if attack is None:
        summary = runner.run_study(config, console)
    else:
        def build(load_site, load_privacy):
            return attacked_client_app(load_site, load_privacy, attack)

        # The study builds its ClientApp internally; the bench swaps in the attacked one.
        with mock.patch.object(runner, "build_client_app", build):
            summary = runner.run_study(config, console)
    summary["val_auc"] = _last_round_val(run_dir, args.rounds, "val_auc")
    summary["val_acc"] = _last_round_val(run_dir, args.rounds, "val_accuracy")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench strategies")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="comma-separated strategy names (default: all)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-train", type=int, default=0, help="training examples (0: all)")
    parser.add_argument("--max-test", type=int, default=0, help="test examples (0: all)")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--local-steps", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hetlora-ranks", default="2,4,8",
                        help="hetlora: LoRA rank of hospital k is the (k mod n)-th of these "
                             "(global rank: the model's lora_r, 8 by default)")
    parser.add_argument("--config", type=Path, default=None,
                        help="simulation TOML the bench's settings override")
    parser.add_argument("--attack-factors", default="-1,-10,20",
                        help="update factors of the hostile hospital (''; none)")
    parser.add_argument("--attack-strategies", default=",".join(ROBUST))
    parser.add_argument("--attack-claimed-examples", type=int, default=0,
                        help="num-examples the hostile hospital claims (0: its true count); "
                             "a weighted mean gives it the weight it claims")
    parser.add_argument("--baselines", default="pooled,local",
                        help="baselines run once with the first strategy ('' for none)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="keep the runs here (default: a temporary directory)")
    return parser


def _names(text: str) -> list[str]:
    return [n for n in text.split(",") if n]


def _clean_runs(args, names: list[str], root: Path) -> tuple[dict, dict]:
    """Each strategy once without attack (the baselines with the first); prints progress.
    Returns the summaries by strategy and the baselines' scores."""
    results, baseline = {}, {}
    for i, name in enumerate(names):
        summary = _run(args, name, _names(args.baselines) if i == 0 else [], root)
        results[name] = summary
        baseline = baseline or {k: summary[k] for k in ("pooled", "local") if k in summary}
        print(f"  ran {name}: test auc {summary['federated']['auc']:.4f}", flush=True)
    return results, baseline


def _print_table(results: dict, baseline: dict) -> None:
    print()
    print(f"{'strategy':<14}{'sum only':>9}{'test auc':>10}{'test acc':>10}"
          f"{'val auc':>9}{'val acc':>9}{'upload B/hosp/round':>21}")
    for name, summary in results.items():
        fed = summary["federated"]
        print(f"{name:<14}{'yes' if STRATEGIES[name].needs_only_sum else 'no':>9}"
              f"{fed['auc']:>10.4f}{fed['accuracy']:>10.4f}{summary['val_auc']:>9.4f}"
              f"{summary['val_acc']:>9.4f}"
              f"{summary['bytes']['upload_per_hospital_per_round']:>21,.0f}")
    for name, scores in baseline.items():
        print(f"{name + ' (baseline)':<23}{scores['auc']:>10.4f}{scores['accuracy']:>10.4f}")


def _attack_runs(args, results: dict, root: Path) -> None:
    """One hostile hospital per attack factor, for each rule; prints test AUC and a verdict
    (survives: within 0.05 AUC of the rule's clean run)."""
    factors = [float(f) for f in _names(args.attack_factors)]
    if not factors:
        return
    print()
    claim = (f", claiming {args.attack_claimed_examples} examples"
             if args.attack_claimed_examples else "")
    print(f"one hostile hospital (partition 0{claim}) sends global + factor * its update:")
    print(f"{'strategy':<14}" + "".join(f"{'x' + format(f, 'g'):>10}" for f in factors)
          + "   (test auc)")
    clean_auc = {n: results[n]["federated"]["auc"] for n in results}
    for name in _names(args.attack_strategies):
        attacks = [UpdateAttack(0, f, args.attack_claimed_examples) for f in factors]
        aucs = [_run(args, name, [], root, attack)["federated"]["auc"] for attack in attacks]
        if name in clean_auc:
            survives = all(a >= clean_auc[name] - 0.05 for a in aucs)
            verdict = "survives" if survives else "degraded"
        else:
            verdict = "(no clean run in this bench to compare)"
        print(f"{name:<14}" + "".join(f"{a:>10.4f}" for a in aucs) + f"   {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = _names(args.strategies)
    for name in names + _names(args.attack_strategies):
        if name not in STRATEGIES:
            parser.error(f"unknown strategy '{name}': choose from {sorted(STRATEGIES)}")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.run_dir or Path(tmp)
        print(f"PneumoniaMNIST, {args.hospitals} hospitals, Dirichlet alpha {args.alpha}, "
              f"{args.rounds} rounds, {args.image_size} px, train subset {args.max_train or 'all'}"
              f", test subset {args.max_test or 'all'}, {args.local_epochs} local epoch(s)"
              f"{f' / {args.local_steps} steps' if args.local_steps else ''}", flush=True)
        results, baseline = _clean_runs(args, names, root)
        _print_table(results, baseline)
        _attack_runs(args, results, root)
        if results and "pooled" in baseline:
            best = max(s["federated"]["auc"] for s in results.values())
            print()
            print(f"best federated auc - pooled auc: {best - baseline['pooled']['auc']:.4f}")
    return 0
