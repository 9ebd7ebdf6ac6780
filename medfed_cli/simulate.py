"""``medfed simulate`` and ``medfed scenarios``: simulated hospitals on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.table import Table

from medfed_cli.common import console, quiet_flower


# Errors a simulation reports to the user as one line (a bad TOML, a missing dataset).
def simulate_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags that were given, nested like the TOML file."""
    table = {
        "seed": ("", "seed"), "run_dir": ("", "run_dir"), "ray_address": ("", "ray_address"),
        "hospitals": ("data", "num_hospitals"), "dataset": ("data", "dataset"),
        "partition": ("data", "partition"), "alpha": ("data", "alpha"),
        "max_train_examples": ("data", "max_train_examples"),
        "max_test_examples": ("data", "max_test_examples"),
        "backbone": ("model", "backbone"), "image_size": ("model", "image_size"),
        "lora_r": ("model", "lora_r"), "lora_alpha": ("model", "lora_alpha"),
        "rounds": ("federation", "rounds"), "min_hospitals": ("federation", "min_hospitals"),
        "local_epochs": ("train", "local_epochs"), "lr": ("train", "lr"),
        "lr_decay": ("train", "lr_decay"), "local_steps": ("train", "local_steps"),
        "batch_size": ("train", "batch_size"),
        "slices_per_case": ("segmentation", "train_slices_per_case"),
    }
    overrides: dict[str, Any] = {}
    for flag, (section, key) in table.items():
        value = getattr(args, flag)
        if value is None:
            continue
        (overrides.setdefault(section, {}) if section else overrides)[key] = value
    if args.prior is not None:
        overrides.setdefault("evaluation", {})["prior"] = args.prior
    if args.no_baselines:
        overrides["baselines"] = []
    if args.as_dicom:
        overrides.setdefault("data", {})["as_dicom"] = True
    if args.secure_aggregation:
        overrides.setdefault("federation", {}).setdefault("secure_aggregation", {})[
            "enabled"] = True
    return overrides


def parse_prior(text: str) -> list[float]:
    """``--prior``: ``equal`` (no prior: the class-balanced rule) or one share per class,
    comma-separated in class order (e.g. ``0.27,0.73``); the study's reader checks the sum."""
    if text.strip().lower() == "equal":
        return []
    try:
        return [float(part) for part in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--prior {text!r}: give 'equal' or one share per class, comma-separated, in class "
            f"order (e.g. 0.27,0.73)") from err


def base_config(args: argparse.Namespace, overrides: dict[str, Any]):
    """``--scenario`` or ``--config`` (not both), then ``overrides``."""
    from simulations.config import ConfigError, load_config
    from simulations.scenarios import load_scenario

    if args.scenario and args.config:
        raise ConfigError("give --scenario or --config, not both")
    if args.scenario:
        return load_scenario(args.scenario, overrides)
    return load_config(args.config, overrides)


SUMMARY_METRICS = ("auc", "accuracy", "balanced_accuracy", "macro_f1")


def _summary_rows(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The table's rows: federated, pooled, local (mean), the best single hospital, and the
    rule that always answers the commonest test class."""
    rows = []
    for name in ("federated", "pooled", "local"):
        if name in summary:
            m = summary[name]
            # Under DP-SGD the baselines are private too: say at what epsilon.
            label = f"{name} (DP-SGD, eps {m['dp_epsilon']:.2f})" if "dp_epsilon" in m else name
            rows.append((label, m))
    if best := summary.get("local", {}).get("best_hospital"):
        rows.append((f"best hospital alone (#{best['hospital']}, "
                     f"{best['train_examples']} examples)", best))
    if rate := summary.get("decision", {}).get("majority_rate"):
        k = len(summary["decision"]["class_shares"])
        rows.append(("always the commonest class", {
            "auc": 0.5, "accuracy": rate, "balanced_accuracy": 1 / k,
            "macro_f1": 2 * rate / (1 + rate) / k}))
    return rows


def _decision_line(summary: dict[str, Any]) -> str:
    """The published rule's prior and its per-class recall on the test set, in words."""
    published = summary.get("published", {})
    prior = published.get("prior", "")
    line = f"decision rule: {prior if isinstance(prior, str) else f'class prior {prior}'}"
    decision, classes = summary.get("decision", {}), summary.get("classes") or []
    if recall := decision.get("recall_per_class"):
        names = classes if len(classes) == len(recall) else [str(k) for k in range(len(recall))]
        line += "; test recall " + ", ".join(f"{n} {r:.3f}" for n, r in zip(names, recall,
                                                                            strict=True))
    return line


def print_summary(summary: dict[str, Any], run_dir: str) -> None:
    """The test-set table of the federated model and its baselines, the published rule's
    prior and recall per class, bytes sent, run folder."""
    table = Table(title=f"{summary['dataset']}: {summary['hospitals']} hospitals, "
                        f"{summary['rounds']} rounds (test set)")
    for column in ("", "AUC", "accuracy", "balanced acc.", "macro-F1"):
        table.add_column(column, justify="right" if column else "left")
    for label, m in _summary_rows(summary):
        table.add_row(label, *(f"{m.get(k, float('nan')):.4f}" for k in SUMMARY_METRICS))
    console.print(table)
    console.print(_decision_line(summary), markup=False)
    b = summary["bytes"]
    console.print(f"uploaded per hospital per round: {b['upload_per_hospital_per_round']:,.0f} "
                  f"bytes (full model {b['full_model']:,} bytes)")
    console.print(f"run directory: {run_dir}")


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.runner import resolve, run_study

    quiet_flower(args.verbose)
    config = resolve(base_config(args, simulate_overrides(args)))  # names the run directory
    summary = run_study(config, console)
    if summary.get("task_type") == "segmentation":
        from simulations.segmentation_study import summary_lines

        for line in summary_lines(summary):
            console.print(line, markup=False)
        console.print(f"run directory: {config.run_dir}")
        return 0
    print_summary(summary, config.run_dir)
    return 0


def cmd_scenarios(args: argparse.Namespace) -> int:
    from simulations.scenarios import scenario_description, scenario_names, scenario_path

    table = Table(title="named scenarios (medfed simulate --scenario NAME)")
    table.add_column("name")
    table.add_column("what it simulates")
    for name in scenario_names():
        table.add_row(name, scenario_description(scenario_path(name)))
    console.print(table)
    return 0


def add_simulate(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser("simulate", help="federated LoRA fine-tuning of simulated hospitals")
    sim.add_argument("--config", type=Path, help="TOML file (see README); flags override it")
    sim.add_argument("--scenario", help="a named study (medfed scenarios) or a scenario .toml")
    sim.add_argument("--run-dir", help="where results go (default runs/<dataset>-<time>)")
    sim.add_argument("--seed", type=int)
    sim.add_argument("--ray-address",
                     help="attach to a running Ray cluster (HOST:PORT of its head, or auto)")
    sim.add_argument("--dataset", help="MedMNIST-format .npz stem, e.g. pneumoniamnist "
                     "(hippocampus: the segmentation scenario's MRI cases)")
    sim.add_argument("--hospitals", type=int, help="number of simulated hospitals")
    sim.add_argument("--partition", choices=["iid", "dirichlet", "quantity"])
    sim.add_argument("--alpha", type=float, help="Dirichlet label-skew concentration")
    sim.add_argument("--max-train-examples", type=int, help="use a subset (quick checks)")
    sim.add_argument("--max-test-examples", type=int, help="test on a subset (quick checks)")
    sim.add_argument("--backbone", help="efficientnet-lite0-imagenet, hf:<dir-or-hub-id>, or "
                     "merlin-i3resnet152-ct (3D CT encoder; 3D datasets such as adrenalmnist3d)")
    sim.add_argument("--image-size", type=int, help="input side in pixels")
    sim.add_argument("--lora-r", type=int)
    sim.add_argument("--lora-alpha", type=int)
    sim.add_argument("--rounds", type=int)
    sim.add_argument("--min-hospitals", type=int)
    sim.add_argument("--local-epochs", type=int)
    sim.add_argument("--local-steps", type=int, help="optimiser steps per round (0: epochs)")
    sim.add_argument("--lr", type=float)
    sim.add_argument("--lr-decay", type=float, help="learning-rate factor per round")
    sim.add_argument("--batch-size", type=int)
    sim.add_argument("--slices-per-case", type=int,
                     help="segmentation: foreground slices per training case (0: all)")
    sim.add_argument("--no-baselines", action="store_true", help="skip pooled/local baselines")
    sim.add_argument("--prior", type=parse_prior,
                     help="the class prior the published adapter answers for: 'equal' (the "
                     "class-balanced rule, the default) or shares in class order, e.g. 0.27,0.73")
    sim.add_argument("--as-dicom", action="store_true",
                     help="hospitals read their partition as DICOM files + manifest")
    sim.add_argument("--secure-aggregation", action="store_true",
                     help="SecAgg+: the coordinator sees only the sum of the hospitals' updates "
                          "(settings: [federation.secure_aggregation] in the TOML)")
    sim.set_defaults(func=cmd_simulate)


def add_scenarios(sub: argparse._SubParsersAction) -> None:
    scen = sub.add_parser("scenarios", help="list the named simulation scenarios")
    scen.set_defaults(func=cmd_scenarios)
