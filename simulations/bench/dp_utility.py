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

The centred-head recipe (docs/results/2026-12-07-dp-2d-centred-head.md): ``--public-start 0.5
--dp-trainable head --dp-optimizer sgd --dp-lr <lr> --epsilons 8,2 --draws 3``. The public start
centres the head's input on the public images' mean pooled feature (``models.feature_centre``)
and DP-SGD trains the head alone; the reference without DP starts from the same public start
and trains everything. ``--draws N`` runs each DP setting N times (the noise is a CSPRNG at
each hospital, so each run is a fresh draw) and ends with each figure's mean (min-max).
``--validation-only`` prints the hospitals' combined validation AUC of the published round
(``summary.json`` "validation") instead of any test figure: settings are chosen on it, and the
test set is scored once per decision afterwards.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import tomllib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from models.adapters import load_adapter_file
from models.config import TRAINABLE, TrainConfig
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
        values["train"]["trainable"] = args.dp_trainable
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




def _draw_dir(root: Path, epsilon: float | None, draw: int) -> Path:
    """Run directory of one run: ``nodp``, ``eps8``, then ``eps8-d2``, ``eps8-d3``..."""
    name = "nodp" if epsilon is None else f"eps{epsilon:g}"
    return root / (name if draw == 0 else f"{name}-d{draw + 1}")


def _row(summary: dict[str, Any]) -> dict[str, Any]:
    """The bench's figures of one finished run's summary."""
    row: dict[str, Any] = {"auc": summary["federated"]["auc"],
                           "accuracy": summary["federated"]["accuracy"],
                           "val_auc": summary["validation"]["auc"],
                           "time": summary["wall_time_s"]["federated"]}
    spent = summary.get("privacy", {}).get("epsilon_max")
    row["epsilon"] = float("nan") if spent is None else float(spent)
    if "pooled" in summary:
        row["pooled"] = summary["pooled"]["auc"]
    return row


def _spread(values: list[float]) -> str:
    """``mean (min-max)`` of ``values``, 4 decimals."""
    return f"{sum(values) / len(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def _headline(runs: dict[float | None, list[dict[str, Any]]], validation: bool) -> None:
    """The closing lines: the reference's AUC and each epsilon's drop, as mean (min-max) over
    the draws, and the largest epsilon's mean membership-attack AUC."""
    key, label = ("val_auc", "validation ") if validation else ("auc", "")
    reference = [r[key] for r in runs.get(None, [])]
    if reference:
        print(f"federated {label}auc, no dp: {_spread(reference)}")
    base = sum(reference) / len(reference) if reference else None
    epsilons = sorted((e for e in runs if e is not None), reverse=True)
    for epsilon in epsilons if base is not None else []:
        drops = [base - r[key] for r in runs[epsilon]]
        print(f"{label}auc drop at eps={epsilon:g}: {_spread(drops)}")
    attacks = [r["mia"].auc for r in runs.get(epsilons[0], []) if "mia" in r] if epsilons else []
    if attacks:
        print(f"membership auc at eps={epsilons[0]:g}: {sum(attacks) / len(attacks):.3f}")
def _parser() -> argparse.ArgumentParser:
    """The bench's command line."""
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
    parser.add_argument("--dp-trainable", choices=TRAINABLE, default="all",
                        help="what DP-SGD trains (train.trainable; the reference trains all): "
                             "'head' with --public-start is the centred-head recipe")
    parser.add_argument("--draws", type=int, default=1,
                        help="runs of each DP setting (fresh noise each); the closing lines "
                             "give mean (min-max)")
    parser.add_argument("--validation-only", action="store_true",
                        help="print the hospitals' combined validation AUC, no test figure "
                             "(for choosing settings)")
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
    return parser


def _start(args: argparse.Namespace, root: Path) -> str:
    """Train the public start (``--public-start``) under ``root`` (``--reuse``: take the one
    there when its settings match) and return its adapter path ("" without one); prints its
    test AUC unless ``--validation-only``."""
    if not args.public_start:
        return ""
    base = load_config(args.config, _overrides(args, None, root))
    config = PublicStartConfig(dataset=base.data.dataset, fraction=args.public_start,
                               seed=args.seed)
    written = root / "public-start" / "public_start.json"
    record = json.loads(written.read_text()) if args.reuse and written.exists() else None
    if record is None or record["public_start"] != asdict(config):
        record = train_public_start(config, base.model, root / "public-start")
    figure = ("" if args.validation_only else
              f", test auc {record['test']['auc']:.4f}  acc {record['test']['accuracy']:.4f}")
    print(f"  public start: {record['public_images']} val images, no DP, centred "
          f"{record['head_centred']}{figure}", flush=True)
    return str(record["adapter"])


def _run(args: argparse.Namespace, epsilon: float | None, run_dir: Path,
         start: str) -> dict[str, Any]:
    """One run (or its reused summary), its attack, and its progress line."""
    config = load_config(args.config, _overrides(args, epsilon, run_dir, start))
    summary = _reused(config) if args.reuse else None
    if summary is None:
        summary = runner.run_study(config, Console(quiet=True))
    row = _row(summary)
    if args.mia_examples:
        row["mia"] = membership(config, args.mia_examples, args.public_start)
    mia = row.get("mia")
    name = "no DP" if epsilon is None else f"eps={epsilon:g}"
    figures = (f"val auc {row['val_auc']:.4f}" if args.validation_only else
               f"test auc {row['auc']:.4f}  acc {row['accuracy']:.4f}  val auc "
               f"{row['val_auc']:.4f}")
    print(f"  {name:<8} {figures}  eps spent {row['epsilon']:.3f}  federated "
          f"{row['time']:.0f} s"
          + (f"  attack auc {mia.auc:.3f} adv {mia.advantage:.3f}" if mia else "")
          + (f"  pooled auc {row['pooled']:.4f}" if "pooled" in row
             and not args.validation_only else ""), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.public_start and (args.dp_lora_r or args.dp_lora_targets):
        parser.error("--public-start trains one start for every run: it cannot be combined "
                     "with --dp-lora-r or --dp-lora-targets, which change the private runs' "
                     "adapter")
    if args.draws < 1:
        parser.error("--draws must be >= 1")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    epsilons = [float(e) for e in args.epsilons.split(",") if e]
    # The reference and the largest epsilon first: the headline figure arrives soonest.
    settings: list[float | None] = ([None] if args.no_dp else []) + sorted(epsilons,
                                                                          reverse=True)
    print(f"default simulation, every run at batch {args.batch_size} (Poisson under DP), "
          f"lr {args.lr:g}, {args.local_epochs} local epochs; DP-SGD at the hospitals with "
          f"strategy {args.dp_strategy}, trains {args.dp_trainable}, "
          f"{args.dp_optimizer} (lr {args.dp_lr or args.lr:g}), "
          f"clip {args.dp_max_grad_norm:g}, {args.dp_augmentations or 1} view(s) per example, "
          f"{args.accountant} accountant, opacus {args.dp_grad_sample_mode}, "
          f"{args.draws} draw(s); membership attack on "
          f"{args.mia_examples or 'no'} members vs as many unseen examples")
    runs: dict[float | None, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.run_dir or Path(tmp)
        start = _start(args, root)
        for epsilon in settings:
            draws = 1 if epsilon is None else args.draws  # without DP a seed replays the run
            runs[epsilon] = [_run(args, epsilon, _draw_dir(root, epsilon, d), start)
                             for d in range(draws)]
    print()
    if not args.validation_only and args.pooled and None in runs and epsilons:
        top = max(epsilons)
        drop = runs[None][0]["pooled"] - runs[top][0]["pooled"]
        print(f"pooled baseline's auc drop at eps={top:g}: {drop:.4f}")
    _headline(runs, args.validation_only)
    return 0
