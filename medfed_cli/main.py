"""``medfed`` command line. Each subcommand parses its arguments and calls one room."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

console = Console()


def _simulate_overrides(args: argparse.Namespace) -> dict[str, Any]:
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
    }
    overrides: dict[str, Any] = {}
    for flag, (section, key) in table.items():
        value = getattr(args, flag)
        if value is None:
            continue
        (overrides.setdefault(section, {}) if section else overrides)[key] = value
    if args.no_baselines:
        overrides["baselines"] = []
    if args.as_dicom:
        overrides.setdefault("data", {})["as_dicom"] = True
    if args.secure_aggregation:
        overrides.setdefault("federation", {}).setdefault("secure_aggregation", {})[
            "enabled"] = True
    return overrides


def _print_summary(summary: dict[str, Any], run_dir: str) -> None:
    table = Table(title=f"{summary['dataset']}: {summary['hospitals']} hospitals, "
                        f"{summary['rounds']} rounds (test set)")
    for column in ("", "AUC", "accuracy", "macro-F1"):
        table.add_column(column, justify="right" if column else "left")
    for name in ("federated", "pooled", "local"):
        if name in summary:
            m = summary[name]
            # Under DP-SGD the baselines are private too: say at what epsilon.
            label = f"{name} (DP-SGD, eps {m['dp_epsilon']:.2f})" if "dp_epsilon" in m else name
            table.add_row(label, *(f"{m[k]:.4f}" for k in ("auc", "accuracy", "macro_f1")))
    console.print(table)
    b = summary["bytes"]
    console.print(f"uploaded per hospital per round: {b['upload_per_hospital_per_round']:,.0f} "
                  f"bytes (full model {b['full_model']:,} bytes)")
    console.print(f"run directory: {run_dir}")


def _quiet_flower(verbose: bool) -> None:
    """Flower logs every message at INFO through its own handler; medfed's progress says what
    matters, so Flower shows warnings only unless ``--verbose``. Call after Flower is imported."""
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    flwr_logger.propagate = False
    # Flower's SuperLink state database migrates its schema with alembic, which logs every step.
    logging.getLogger("alembic").setLevel(logging.DEBUG if verbose else logging.WARNING)


def _base_config(args: argparse.Namespace, overrides: dict[str, Any]):
    """``--scenario`` or ``--config`` (not both), then ``overrides``."""
    from simulations.config import ConfigError, load_config
    from simulations.scenarios import load_scenario

    if args.scenario and args.config:
        raise ConfigError("give --scenario or --config, not both")
    if args.scenario:
        return load_scenario(args.scenario, overrides)
    return load_config(args.config, overrides)


def cmd_scenarios(args: argparse.Namespace) -> int:
    from simulations.scenarios import scenario_description, scenario_names, scenario_path

    table = Table(title="named scenarios (medfed simulate --scenario NAME)")
    table.add_column("name")
    table.add_column("what it simulates")
    for name in scenario_names():
        table.add_row(name, scenario_description(scenario_path(name)))
    console.print(table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from simulations.report import ReportError, build_report, default_out_dir

    try:
        path = build_report(args.run_dirs, args.out or default_out_dir(args.run_dirs),
                            score_model=not args.no_model)
        if args.tensorboard:
            from simulations.report import load_run
            from simulations.tracking import write_tensorboard

            for run_dir in args.run_dirs:
                write_tensorboard(load_run(run_dir), args.tensorboard)
            console.print(f"TensorBoard: tensorboard --logdir {args.tensorboard}")
    except ReportError as err:
        console.print(f"[red]error:[/] {err}")
        return 1
    console.print(f"report: {path} (figures in {path.parent / 'figures'})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from server.rounds import FederationError
    from simulations.config import ConfigError
    from simulations.sweep import parse_grid, run_sweep

    _quiet_flower(args.verbose)
    try:
        base = _base_config(args, {"baselines": []} if args.no_baselines else {})
        table = run_sweep(base, parse_grid(args.grid), args.out, console)
    except (ConfigError, FederationError, FileNotFoundError, ValueError) as err:
        console.print(f"[red]error:[/] {err}")
        return 1
    console.print(table.to_string(index=False), soft_wrap=True, markup=False)
    console.print(f"sweep results: {args.out / 'sweep.csv'}; "
                  f"compare with: medfed report {args.out}/*/ --out {args.out / 'report'}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from server.rounds import FederationError
    from simulations.config import ConfigError
    from simulations.runner import run_study

    _quiet_flower(args.verbose)
    try:
        config = _base_config(args, _simulate_overrides(args))
        summary = run_study(config, console)
    except (ConfigError, FederationError, FileNotFoundError, ValueError) as err:
        console.print(f"[red]error:[/] {err}")
        return 1
    _print_summary(summary, str(Path(config.run_dir or "runs")))
    return 0


def cmd_hospital_check(args: argparse.Namespace) -> int:
    from client.data.check import check_site
    from client.data.config import SiteDataConfig, SiteDataConfigError, load_site_data_config
    from client.data.config import site_data_config as with_settings
    from client.data.problems import ManifestError

    try:
        config = load_site_data_config(args.config) if args.config else SiteDataConfig()
        flags = {"classes": args.classes, "frames": args.frames,
                 "max_error_fraction": args.max_error_fraction, "cache_dir": args.cache_dir}
        config = with_settings({k: v for k, v in flags.items() if v is not None}, "flags", config)
        text, ready = check_site(args.manifest, config, args.image_size)
    except (SiteDataConfigError, ManifestError) as err:
        console.print(f"[red]error:[/] {err}")
        return 2
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    return 0 if ready else 1


def cmd_hospital_ledger(args: argparse.Namespace) -> int:
    from privacy.ledger import Ledger, run_spends

    if not args.db.is_file():
        console.print(f"[red]error:[/] no ledger at {args.db}: check --db")
        return 1
    spends = run_spends(Ledger(args.db))
    table = Table(title=f"privacy ledger {args.db}")
    for column in ("dataset", "run", "rounds", "mechanisms", "eps run", "eps total", "budget",
                   "remaining", "delta"):
        table.add_column(column, justify="left" if column in ("dataset", "run", "mechanisms")
                         else "right")
    for s in spends:
        table.add_row(s.fingerprint[:16], s.run_id, str(s.rounds), s.mechanisms,
                      f"{s.epsilon_run:.3f}", f"{s.epsilon_total:.3f}", f"{s.budget:g}",
                      f"{s.remaining:.3f}", f"{s.delta:g}")
    console.print(table)
    return 0


def cmd_coordinator_init(args: argparse.Namespace) -> int:
    from server.consortium import ConsortiumError, init_consortium

    try:
        config = init_consortium(args.dir, args.consortium, args.hostname, args.host, args.port)
    except ConsortiumError as err:
        console.print(f"[red]error:[/] {err}")
        return 1
    console.print(f"consortium '{config.consortium}' in {args.dir}: CA {config.ca_cert} (give "
                  f"it to every hospital), TLS {config.server_cert}, enrolment list "
                  f"{config.enrolment} (empty)")
    return 0


def cmd_coordinator_enroll(args: argparse.Namespace) -> int:
    from privacy.pki import KeyFileError
    from server.consortium import ConsortiumError, enrol

    try:
        entry = enrol(args.dir, args.name, args.hospital_key)
    except (ConsortiumError, KeyFileError) as err:
        console.print(f"[red]error:[/] {err}")
        return 1
    console.print(f"enrolled hospital '{entry.name}' ({entry.fingerprint})")
    return 0


def cmd_coordinator_revoke(args: argparse.Namespace) -> int:
    from server.consortium import ConsortiumError, revoke

    try:
        entry = revoke(args.dir, args.name)
    except ConsortiumError as err:
        console.print(f"[red]error:[/] {err}")
        return 1
    console.print(f"revoked hospital '{entry.name}' ({entry.fingerprint}) at {entry.revoked_at}")
    return 0


def cmd_coordinator_hospitals(args: argparse.Namespace) -> int:
    from server.consortium import ConsortiumError, load_enrolments

    try:
        entries = load_enrolments(args.dir)
    except ConsortiumError as err:
        console.print(f"[red]error:[/] {err}")
        return 1
    table = Table(title=f"hospitals of {args.dir}")
    for column in ("name", "fingerprint", "enrolled", "revoked"):
        table.add_column(column)
    for e in entries:
        table.add_row(e.name, e.fingerprint[:23] + "...", e.enrolled_at, e.revoked_at or "-")
    console.print(table)
    return 0


def cmd_hospital_init(args: argparse.Namespace) -> int:
    from client.site_folder import SiteFolderError, init_site_folder

    try:
        config = init_site_folder(args.dir, args.name, args.superlink, args.manifest or "")
    except (SiteFolderError, FileExistsError) as err:
        console.print(f"[red]error:[/] {err}")
        return 1
    console.print(f"hospital '{config.name}' in {args.dir}: send {args.dir / config.node_pub} to "
                  f"the coordinator; put the consortium's CA certificate at "
                  f"{args.dir / config.ca_cert}; review {args.dir / config.privacy_policy}")
    return 0


def _exec_daemon(argv: list[str], print_only: bool, flwr_home: Path,
                 extra_env: dict[str, str] | None = None) -> int:
    """Print the daemon's command, or replace this process with it (so that systemd supervises
    Flower's daemon directly and signals reach it). Flower's state goes to ``flwr_home``;
    ``extra_env`` is added to its environment."""
    import os
    import shlex

    from server.daemon import daemon_env

    console.print(shlex.join(argv), markup=False, highlight=False, soft_wrap=True)
    if print_only:
        return 0
    flwr_home.mkdir(parents=True, exist_ok=True)
    os.execve(argv[0], argv, daemon_env(flwr_home, argv[0]) | (extra_env or {}))
    return 1  # not reached


def cmd_coordinator_start(args: argparse.Namespace) -> int:
    from privacy.pki import KeyFileError
    from server.daemon import flwr_cli_home, run_coordinator, superlink_command

    try:
        if args.study is not None and not args.print_command:
            if not args.study.is_file():
                console.print(f"[red]error:[/] study file {args.study} does not exist")
                return 1
            return run_coordinator(args.dir, args.study, args.run_dir, insecure=args.insecure)
        argv = superlink_command(args.dir, insecure=args.insecure)
        home = flwr_cli_home(args.dir, insecure=args.insecure)
    except (ValueError, KeyFileError, FileNotFoundError, RuntimeError) as err:
        # ValueError: ConsortiumError, or the study's ConfigError (both name the file).
        console.print(f"[red]error:[/] {err}")
        return 1
    return _exec_daemon(argv, args.print_command, home)


def cmd_hospital_start(args: argparse.Namespace) -> int:
    import os
    import shlex
    import subprocess

    from client.daemon import supernode_command, thread_env, warm_exec_command
    from client.site_folder import SiteFolderError
    from server.daemon import daemon_env

    try:
        argv = supernode_command(args.dir, insecure=args.insecure)
        # This process becomes the SuperNode (execve keeps the pid): the warm SuperExec
        # watches that pid and stops with it.
        warm = warm_exec_command(args.dir, os.getpid())
        threads = thread_env(args.dir)
    except (SiteFolderError, FileNotFoundError) as err:
        console.print(f"[red]error:[/] {err}")
        return 1
    home = args.dir.resolve() / "flwr-home"
    if warm is not None:
        shown = warm[:-1] + ["SUPERNODE_PID"] if args.print_command else warm
        console.print(shlex.join(shown), markup=False, highlight=False, soft_wrap=True)
        if not args.print_command:
            home.mkdir(parents=True, exist_ok=True)
            subprocess.Popen(warm, env=daemon_env(home, argv[0]) | threads)  # noqa: S603
    return _exec_daemon(argv, args.print_command, home, threads)


def cmd_coordinator_register(args: argparse.Namespace) -> int:
    import subprocess

    from privacy.pki import KeyFileError
    from server.consortium import ConsortiumError
    from server.daemon import sync_registry

    def run(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        return done.returncode, done.stdout + done.stderr

    try:
        lines = sync_registry(args.dir, run)
    except (ConsortiumError, KeyFileError) as err:
        console.print(f"[red]error:[/] {err}")
        return 1
    for line in lines or ["the SuperLink's registry matches the enrolment list"]:
        console.print(line, markup=False)
    return 1 if any(line.startswith("error:") for line in lines) else 0


def cmd_coordinator_status(args: argparse.Namespace) -> int:
    import subprocess

    from server.consortium import ConsortiumError
    from server.daemon import registry_listing_command
    from server.status import hospital_statuses, run_statuses

    try:
        argv, env = registry_listing_command(args.dir)
        listing = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        hospitals = hospital_statuses(args.dir, listing.stdout)
        runs = run_statuses(args.dir)
    except (ConsortiumError, ValueError, subprocess.TimeoutExpired) as err:
        console.print(f"[red]error:[/] {err}")
        return 1
    table = Table(title="hospitals")
    for column in ("name", "node", "status", "online since", "revoked"):
        table.add_column(column)
    for h in hospitals:
        table.add_row(h.name, h.node_id, h.status, h.online_since, "yes" if h.revoked else "")
    console.print(table)
    runs_table = Table(title="runs")
    for column in ("run", "state", "last round", "last error"):
        runs_table.add_column(column)
    for r in runs:
        runs_table.add_row(r.run_dir, r.state, "" if r.last_round is None else str(r.last_round),
                           r.last_error)
    console.print(runs_table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfed", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's own logs")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="federated LoRA fine-tuning of simulated hospitals")
    sim.add_argument("--config", type=Path, help="TOML file (see README); flags override it")
    sim.add_argument("--scenario", help="a named study (medfed scenarios) or a scenario .toml")
    sim.add_argument("--run-dir", help="where results go (default runs/<dataset>-<time>)")
    sim.add_argument("--seed", type=int)
    sim.add_argument("--ray-address",
                     help="attach to a running Ray cluster (HOST:PORT of its head, or auto)")
    sim.add_argument("--dataset", help="MedMNIST-format .npz stem, e.g. pneumoniamnist")
    sim.add_argument("--hospitals", type=int, help="number of simulated hospitals")
    sim.add_argument("--partition", choices=["iid", "dirichlet", "quantity"])
    sim.add_argument("--alpha", type=float, help="Dirichlet label-skew concentration")
    sim.add_argument("--max-train-examples", type=int, help="use a subset (quick checks)")
    sim.add_argument("--max-test-examples", type=int, help="test on a subset (quick checks)")
    sim.add_argument("--backbone", help="efficientnet-lite0-imagenet or hf:<dir-or-hub-id>")
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
    sim.add_argument("--no-baselines", action="store_true", help="skip pooled/local baselines")
    sim.add_argument("--as-dicom", action="store_true",
                     help="hospitals read their partition as DICOM files + manifest (issue 3)")
    sim.add_argument("--secure-aggregation", action="store_true",
                     help="SecAgg+: the coordinator sees only the sum of the hospitals' updates "
                          "(settings: [federation.secure_aggregation] in the TOML)")
    sim.set_defaults(func=cmd_simulate)

    scen = sub.add_parser("scenarios", help="list the named simulation scenarios")
    scen.set_defaults(func=cmd_scenarios)

    rep = sub.add_parser("report", help="HTML report (and PNG figures) of one or more runs")
    rep.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR",
                     help="run directories written by medfed simulate / sweep")
    rep.add_argument("--out", type=Path,
                     help="output folder (default RUN_DIR/report, or reports/compare-<time>)")
    rep.add_argument("--no-model", action="store_true",
                     help="skip reloading the adapter (no ROC, confusion matrix, calibration)")
    rep.add_argument("--tensorboard", type=Path, metavar="DIR",
                     help="also write TensorBoard event files there (needs tensorboard)")
    rep.set_defaults(func=cmd_report)

    swp = sub.add_parser("sweep", help="one simulation per point of a grid, each in its own "
                                       "folder")
    swp.add_argument("--scenario", help="base study: a named scenario or a .toml file")
    swp.add_argument("--config", type=Path, help="base study: a TOML config file")
    swp.add_argument("--grid", action="append", required=True, metavar="SECTION.KEY=V1,V2",
                     help="a setting and its values, e.g. data.num_hospitals=3,5 (repeatable)")
    swp.add_argument("--out", type=Path, required=True, help="sweep folder")
    swp.add_argument("--no-baselines", action="store_true", help="skip pooled/local baselines")
    swp.set_defaults(func=cmd_sweep)

    hospital = sub.add_parser("hospital", help="commands a hospital runs next to its images")
    hospital_sub = hospital.add_subparsers(dest="hospital_command", required=True)
    check = hospital_sub.add_parser(
        "check", help="read a manifest and its DICOM files once and report what is usable")
    check.add_argument("--manifest", type=Path, required=True, help="the CSV manifest")
    check.add_argument("--config", type=Path, help="site data TOML ([site_data] table)")
    check.add_argument("--classes", nargs="+", help="class names in label order")
    check.add_argument("--frames", choices=["middle", "all"])
    check.add_argument("--max-error-fraction", type=float,
                       help="fail above this share of unusable rows (default 0.1)")
    check.add_argument("--image-size", type=int, default=64,
                       help="model input side in pixels; the run's, so the check fills the cache")
    check.add_argument("--cache-dir", help="decoded-image cache folder")
    check.set_defaults(func=cmd_hospital_check)

    ledger = hospital_sub.add_parser(
        "ledger", help="the hospital's privacy ledger: runs, rounds, epsilon spent, remaining")
    ledger.add_argument("--db", type=Path, required=True, help="the ledger's SQLite file")
    ledger.set_defaults(func=cmd_hospital_ledger)

    # Issue 6: deployment (consortium PKI, enrolment, the hospital's site folder).
    site_init = hospital_sub.add_parser(
        "init", help="make a hospital's site folder: node key pair, privacy policy, config")
    site_init.add_argument("name", help="the hospital's name, as the coordinator enrols it")
    site_init.add_argument("--dir", type=Path, required=True, help="the site folder to create")
    site_init.add_argument("--superlink", default="localhost:8000",
                           help="the coordinator's Fleet API host:port")
    site_init.add_argument("--manifest", help="the CSV data manifest (can be set later)")
    site_init.set_defaults(func=cmd_hospital_init)

    coordinator = sub.add_parser("coordinator", help="commands the consortium's coordinator runs")
    coordinator_sub = coordinator.add_subparsers(dest="coordinator_command", required=True)
    c_init = coordinator_sub.add_parser(
        "init", help="make a consortium folder: CA, TLS certificate, config, enrolment list")
    c_init.add_argument("dir", type=Path, help="the consortium folder to create")
    c_init.add_argument("--consortium", default="medfed", help="the consortium's name")
    c_init.add_argument("--hostname", action="append", default=[],
                        help="a name or IP hospitals reach the coordinator by (repeatable)")
    c_init.add_argument("--host", default="0.0.0.0", help="address the SuperLink listens on")
    c_init.add_argument("--port", type=int, default=8000,
                        help="the SuperLink's port (Flower 1.42: one port for all its APIs)")
    c_init.set_defaults(func=cmd_coordinator_init)
    c_enroll = coordinator_sub.add_parser("enroll", help="enrol a hospital's public key")
    c_enroll.add_argument("dir", type=Path, help="the consortium folder")
    c_enroll.add_argument("--hospital-key", type=Path, required=True,
                          help="the hospital's node.pub (from 'medfed hospital init')")
    c_enroll.add_argument("--name", required=True, help="the hospital's name")
    c_enroll.set_defaults(func=cmd_coordinator_enroll)
    c_revoke = coordinator_sub.add_parser("revoke", help="revoke a hospital's enrolment")
    c_revoke.add_argument("dir", type=Path, help="the consortium folder")
    c_revoke.add_argument("--name", required=True, help="the hospital's name")
    c_revoke.set_defaults(func=cmd_coordinator_revoke)
    c_list = coordinator_sub.add_parser("hospitals", help="list enrolled and revoked hospitals")
    c_list.add_argument("dir", type=Path, help="the consortium folder")
    c_list.set_defaults(func=cmd_coordinator_hospitals)
    c_start = coordinator_sub.add_parser(
        "start", help="run the SuperLink with the consortium's TLS files and node authentication")
    c_start.add_argument("dir", type=Path, help="the consortium folder")
    c_start.add_argument("--insecure", action="store_true",
                         help="plaintext, no authentication: loopback tests only")
    c_start.add_argument("--print-command", action="store_true",
                         help="print the flower-superlink command instead of running it")
    c_start.add_argument("--study", type=Path,
                         help="run this study (TOML: [model], [train], [federation], [privacy], "
                              "[data] for the test set) on the enrolled hospitals, then stop; "
                              "the same command after a crash resumes the run")
    c_start.add_argument("--run-dir", type=Path,
                         help="the run's records (default: DIR/runs/<study file stem>)")
    c_start.set_defaults(func=cmd_coordinator_start)
    c_register = coordinator_sub.add_parser(
        "register", help="sync the running SuperLink's registry with the enrolment list "
                         "(register enrolled keys, unregister revoked ones)")
    c_register.add_argument("dir", type=Path, help="the consortium folder")
    c_register.set_defaults(func=cmd_coordinator_register)
    c_status = coordinator_sub.add_parser(
        "status", help="hospitals connected (from the running SuperLink) and runs' last rounds")
    c_status.add_argument("dir", type=Path, help="the consortium folder")
    c_status.set_defaults(func=cmd_coordinator_status)
    h_start = hospital_sub.add_parser(
        "start", help="run the hospital's SuperNode (TLS, node key, its node config)")
    h_start.add_argument("--dir", type=Path, required=True, help="the site folder")
    h_start.add_argument("--insecure", action="store_true",
                         help="plaintext, no authentication: loopback tests only")
    h_start.add_argument("--print-command", action="store_true",
                         help="print the flower-supernode command instead of running it")
    h_start.set_defaults(func=cmd_hospital_start)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
