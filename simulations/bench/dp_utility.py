"""What DP-SGD at the hospitals costs in test AUC, and what it buys against membership inference.

Runs the default simulation (``SimulationConfig()``: 5 hospitals, Dirichlet 0.5, 48 px, 4 rounds;
baselines skipped unless ``--pooled``) without DP and with DP-SGD at each hospital for each
target epsilon (the whole run's epsilon per hospital, ``delta`` from the config), and prints the
final test AUC of each.
Every run, the non-private reference included, trains with the bench's settings
(``--batch-size --lr --local-epochs``, by default the simulation's: 64, 2e-3, 2; under DP,
Poisson batches of that expected size), so the drop measures DP alone.
After each run a loss-threshold membership-inference attack (``privacy.membership``) scores
the final global adapter on the hospitals' training examples against the unused MedMNIST
validation split (same distribution, matched label counts). Ends with
``auc drop at eps=<largest>: <number>`` (non-DP AUC minus DP AUC). With ``--pooled`` each run
also trains the pooled baseline (all hospitals' data in one place, under DP-SGD at the same
epsilon), and the pooled drop is printed before that last line.
With ``--public-start F`` every run, the reference included, starts from an adapter trained
without DP on a seeded share ``F`` of the dataset's ``val`` split (``simulations.public_start``:
public data no hospital holds); its own test AUC is printed first, so what the hospitals add to
it shows, and the attack's non-members come from the rest of ``val``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from models.adapters import load_adapter_file
from models.config import TrainConfig
from models.data import ImageSet
from models.lora import build_lora_model
from privacy.config import OPTIMIZERS, DPConfig
from privacy.membership import MembershipResult, loss_threshold_attack, matched_non_members
from server.records import RunRecords
from simulations import runner
from simulations.config import SimulationConfig, config_dict, load_config
from simulations.public_start import PublicStartConfig, public_split, train_public_start
from simulations.sites import cached_dataset, hospital_sites

logger = logging.getLogger(__name__)


def _overrides(args: argparse.Namespace, epsilon: float | None, run_dir: Path,
               start: str = "") -> dict[str, Any]:
    values: dict[str, Any] = {"seed": args.seed, "run_dir": str(run_dir),
                              "baselines": ["pooled"] if args.pooled else []}
    if start:
        values["federation"] = {"initial_adapter": start}
    if args.max_train or args.max_test:
        values["data"] = {"max_train_examples": args.max_train,
                          "max_test_examples": args.max_test}
    if args.rounds:
        values.setdefault("federation", {})["rounds"] = args.rounds
    values["train"] = {"batch_size": args.batch_size, "lr": args.lr,
                       "local_epochs": args.local_epochs}
    if epsilon is not None:
        values["privacy"] = {"dpsgd": True, "dp_target_epsilon": epsilon,
                             "dp_noise_multiplier": args.dp_noise_multiplier,
                             "dp_accountant": args.accountant,
                             "dp_max_grad_norm": args.dp_max_grad_norm,
                             "dp_grad_sample_mode": args.dp_grad_sample_mode,
                             "dp_optimizer": args.dp_optimizer, "dp_lr": args.dp_lr,
                             "dp_momentum": args.dp_momentum,
                             "dp_augmentations": args.dp_augmentations}
        values.setdefault("federation", {})["strategy"] = args.dp_strategy
        if args.dp_lora_r:
            values["model"] = {"lora_r": args.dp_lora_r, "lora_alpha": 2 * args.dp_lora_r}
        if args.dp_lora_targets:
            values.setdefault("model", {})["lora_targets"] = args.dp_lora_targets.split(",")
    return values


def membership(config: SimulationConfig, limit: int, public_fraction: float = 0.0
               ) -> MembershipResult:
    """Loss-threshold attack on a finished run's global adapter (``<run_dir>/adapter``); the
    non-members come from the ``val`` split, less its ``public_fraction`` the start trained on."""
    config = runner.resolve(config)
    model = build_lora_model(config.model, verify=False)
    load_adapter_file(model, Path(config.run_dir) / "adapter")
    sites = hospital_sites(config.data, config.model.image_size, config.seed)
    members = ImageSet.concat([s.train for s in sites])
    pool = cached_dataset(config.data.dataset, config.model.image_size).splits["val"]
    if public_fraction:
        _, pool = public_split(config.data.dataset, config.model.image_size, public_fraction,
                               config.seed)
    elif config.federation.initial_adapter:
        logger.warning("the run starts from %s: if that adapter trained on val images, some "
                       "of the attack's non-members are its members (use --public-start)",
                       config.federation.initial_adapter)
    members, non_members = matched_non_members(members, pool, config.seed, limit)
    return loss_threshold_attack(model, members, non_members)


def _reused(config: SimulationConfig) -> dict[str, Any] | None:
    """A finished run's summary in ``config.run_dir`` when its config.toml is this config's
    (DP-SGD's engine setting aside in a run without DP-SGD)."""
    run_dir = Path(config.run_dir)
    if not (run_dir / "summary.json").exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:  # this config, written as a run writes it
        path = RunRecords(Path(tmp)).write_config(config_dict(runner.resolve(config)))
        expected = tomllib.loads(path.read_text())
    written = tomllib.loads((run_dir / "config.toml").read_text())
    for values in (expected, written):
        if not values.get("privacy", {}).get("dpsgd"):
            values.get("privacy", {}).pop("dp_grad_sample_mode", None)
    if expected != written:
        return None
    return json.loads((run_dir / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench dp-utility")
    parser.add_argument("--epsilons", default="1,3,8", help="target epsilons per run")
    parser.add_argument("--no-dp", action=argparse.BooleanOptionalAction, default=True,
                        help="also run without DP (the reference of the AUC drop)")
    parser.add_argument("--accountant", default="prv", choices=["rdp", "prv"])
    defaults = TrainConfig()
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="batch of every run (the expected Poisson batch under DP)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="learning rate of every run")
    parser.add_argument("--local-epochs", type=int, default=defaults.local_epochs,
                        help="local epochs per round of every run")
    parser.add_argument("--dp-strategy", default="fedavg")
    parser.add_argument("--dp-lora-r", type=int, default=0, help="LoRA rank (0: the default)")
    parser.add_argument("--dp-lora-targets", default="",
                        help="comma-separated layer names LoRA wraps (empty: the default)")
    parser.add_argument("--dp-noise-multiplier", type=float, default=0.0,
                        help="fixed noise multiplier (0: derived from each target epsilon)")
    parser.add_argument("--dp-max-grad-norm", type=float, default=1.0)
    parser.add_argument("--dp-optimizer", default=DPConfig.dp_optimizer,
                        choices=list(OPTIMIZERS), help="optimiser of the DP-SGD runs")
    parser.add_argument("--dp-lr", type=float, default=DPConfig.dp_lr,
                        help="learning rate of the DP-SGD runs (0: --lr)")
    parser.add_argument("--dp-momentum", type=float, default=DPConfig.dp_momentum,
                        help="SGD momentum of the DP-SGD runs")
    parser.add_argument("--dp-augmentations", type=int, default=DPConfig.dp_augmentations,
                        help="augmentation multiplicity under DP-SGD (0: off)")
    parser.add_argument("--dp-grad-sample-mode", default=DPConfig.dp_grad_sample_mode,
                        help="opacus per-example gradient engine (see privacy.config)")
    parser.add_argument("--reuse", action="store_true",
                        help="take a run whose summary.json is already in --run-dir (same "
                             "config.toml) instead of running it again")
    parser.add_argument("--rounds", type=int, default=0, help="0: the default")
    parser.add_argument("--max-train", type=int, default=0, help="training examples (0: all)")
    parser.add_argument("--max-test", type=int, default=0, help="test examples (0: all)")
    parser.add_argument("--mia-examples", type=int, default=500,
                        help="members (and as many non-members) the attack scores; 0: skip it")
    parser.add_argument("--pooled", action="store_true",
                        help="also train the pooled baseline of each run (all hospitals' data in "
                             "one place; under DP-SGD at the same epsilon): how much of the drop "
                             "is privacy and how much is federation")
    parser.add_argument("--public-start", type=float, default=0.0, metavar="FRACTION",
                        help="start every run from an adapter trained without DP on this share "
                             "of the val split (public data no hospital holds; 0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=None,
                        help="simulation TOML the bench's settings override")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.public_start and (args.dp_lora_r or args.dp_lora_targets):
        parser.error("--public-start trains one start for every run: it cannot be combined "
                     "with --dp-lora-r or --dp-lora-targets, which change the private runs' "
                     "adapter")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    epsilons = [float(e) for e in args.epsilons.split(",") if e]
    # The reference and the largest epsilon first: the headline figure arrives soonest.
    settings: list[float | None] = ([None] if args.no_dp else []) + sorted(epsilons,
                                                                          reverse=True)

    print(f"default simulation, every run at batch {args.batch_size} (Poisson under DP), "
          f"lr {args.lr:g}, {args.local_epochs} local epochs; DP-SGD at the hospitals with "
          f"strategy {args.dp_strategy}, "
          f"{args.dp_optimizer} (lr {args.dp_lr or args.lr:g}), "
          f"clip {args.dp_max_grad_norm:g}, {args.dp_augmentations or 1} view(s) per example, "
          f"{args.accountant} accountant, opacus "
          f"{args.dp_grad_sample_mode}; membership attack on "
          f"{args.mia_examples or 'no'} members vs as many unseen examples")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.run_dir or Path(tmp)
        start = ""
        if args.public_start:
            base = load_config(args.config, _overrides(args, None, root))
            record = train_public_start(
                PublicStartConfig(dataset=base.data.dataset, fraction=args.public_start,
                                  seed=args.seed), base.model, root / "public-start")
            start = str(record["adapter"])
            print(f"  public start: {record['public_images']} val images, no DP, test auc "
                  f"{record['test']['auc']:.4f}  acc {record['test']['accuracy']:.4f}",
                  flush=True)
        for epsilon in settings:
            name = "no DP" if epsilon is None else f"eps={epsilon:g}"
            run_dir = root / ("nodp" if epsilon is None else f"eps{epsilon:g}")
            config = load_config(args.config, _overrides(args, epsilon, run_dir, start))
            summary = _reused(config) if args.reuse else None
            if summary is None:
                summary = runner.run_study(config, Console(quiet=True))
            row: dict[str, Any] = {"auc": summary["federated"]["auc"],
                                   "accuracy": summary["federated"]["accuracy"],
                                   "time": summary["wall_time_s"]["federated"]}
            spent = summary.get("privacy", {}).get("epsilon_max")
            row["epsilon"] = float("nan") if spent is None else float(spent)
            if "pooled" in summary:
                row["pooled"] = summary["pooled"]["auc"]
            if args.mia_examples:
                row["mia"] = membership(config, args.mia_examples, args.public_start)
            results[name] = row
            mia = row.get("mia")
            print(f"  {name:<8} test auc {row['auc']:.4f}  acc {row['accuracy']:.4f}  "
                  f"federated {row['time']:.0f} s"
                  + (f"  attack auc {mia.auc:.3f} adv {mia.advantage:.3f}" if mia else "")
                  + (f"  pooled auc {row['pooled']:.4f}" if "pooled" in row else ""),
                  flush=True)

    print()
    print(f"{'run':<10}{'test auc':>10}{'test acc':>10}{'eps spent':>11}{'attack auc':>12}"
          f"{'advantage':>11}" + (f"{'pooled auc':>12}" if args.pooled else ""))
    for name, row in results.items():
        mia = row.get("mia")
        print(f"{name:<10}{row['auc']:>10.4f}{row['accuracy']:>10.4f}{row['epsilon']:>11.3f}"
              + (f"{mia.auc:>12.3f}{mia.advantage:>11.3f}" if mia
                 else f"{'':>23}" if "pooled" in row else "")
              + (f"{row['pooled']:>12.4f}" if "pooled" in row else ""))
    if "no DP" in results and epsilons:
        top = max(epsilons)
        if args.pooled:
            pooled_drop = results["no DP"]["pooled"] - results[f"eps={top:g}"]["pooled"]
            print(f"pooled baseline's auc drop at eps={top:g}: {pooled_drop:.4f}")
        drop = results["no DP"]["auc"] - results[f"eps={top:g}"]["auc"]
        print(f"auc drop at eps={top:g}: {drop:.4f}")
    return 0
