"""``medfed hospital ...``: what a hospital runs next to its images."""

from __future__ import annotations

import argparse
from pathlib import Path

from medfed_cli.common import UsageError, console, exec_daemon
from medfed_cli.errors import exit_code_on_error


@exit_code_on_error(2)
def cmd_hospital_check(args: argparse.Namespace) -> int:
    from client.data.check import check_site
    from client.data.config import SiteDataConfig, from_node_config, load_site_data_config
    from client.data.config import site_data_config as with_settings
    from client.data.segmentation_check import check_segmentation_site, is_segmentation_manifest

    if (args.dir is None) == (args.manifest is None):
        raise UsageError("give --dir SITE (its hospital.toml) or --manifest FILE")
    if args.dir is not None:  # what the daemon reads: manifest, classes, [site_data]
        from client.site_folder import load_hospital_config, node_config

        values = node_config(args.dir, load_hospital_config(args.dir))
        if "manifest" not in values:
            raise UsageError(f"{args.dir / 'hospital.toml'}: set 'manifest' in [hospital]")
        args.manifest = Path(values["manifest"])
        config = from_node_config(values)
    else:
        config = load_site_data_config(args.config) if args.config else SiteDataConfig()
    flags = {"classes": args.classes, "frames": args.frames,
             "max_error_fraction": args.max_error_fraction, "cache_dir": args.cache_dir}
    config = with_settings({k: v for k, v in flags.items() if v is not None}, "flags", config)
    if args.study is not None and args.dir is None:
        raise UsageError("--study needs --dir SITE (the policies and data the daemon uses)")
    report = args.report or (args.dir / CHECK_REPORT if args.dir is not None else None)
    if is_segmentation_manifest(args.manifest):  # image + mask columns: NIfTI volumes
        text, ready = check_segmentation_site(args.manifest, config, report)
    else:
        text, ready = check_site(args.manifest, config, args.image_size, report)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    if args.study is not None:
        text, takes_part = study_check_text(args.dir, args.study)
        console.print(text, markup=False, highlight=False, soft_wrap=True)
        ready = ready and takes_part
    return 0 if ready else 1


def study_check_text(site_dir: Path, study_file: Path) -> tuple[str, bool]:
    """The dry run of ``study_file`` against the site folder's policies and data, as the
    coordinator asks it before round 1 (``client.study_check``): one line per item, and
    whether every item passes."""
    from flwr.app import Context, RecordDict

    from client.privacy_round import site_privacy_from_node_config
    from client.site import load_site_from_node_config
    from client.site_folder import load_hospital_config, node_config
    from client.study_check import study_checks
    from server.deployment_app import load_study
    from server.rounds import study_round_config

    values = node_config(site_dir, load_hospital_config(site_dir))
    context = Context(run_id=0, node_id=0, node_config=dict(values), state=RecordDict(),
                      run_config={})
    items = study_checks(study_round_config(load_study(study_file)), context,
                         load_site_from_node_config, site_privacy_from_node_config)
    lines = [f"study {study_file}: what this hospital would answer the coordinator's check"]
    lines += [f"  {item.name:<22} {item.answer}" for item in items]
    passed = all(item.passed for item in items)
    lines.append("this hospital takes part in the study" if passed else
                 "this hospital would refuse the study: change the setting named above (in "
                 "this site folder) or ask the coordinator to change the study")
    return "\n".join(lines), passed


CHECK_REPORT = "check-report.txt"
"""The full check report in a site folder (``medfed hospital check --dir``)."""


def cmd_hospital_ledger(args: argparse.Namespace) -> int:
    from privacy.ledger import Ledger, run_spends

    if not args.db.is_file():
        raise UsageError(f"no ledger at {args.db}: check --db")
    spends = run_spends(Ledger(args.db))
    # Lines, not a table: ids are shown whole at any terminal width (a table cut them at 80).
    console.print(f"privacy ledger {args.db}: {len(spends)} runs", highlight=False,
                  soft_wrap=True, markup=False)
    for s in spends:
        twice = (f" - {s.charges - s.rounds} more charges than rounds: a round was charged "
                 "more than once" if s.charges > s.rounds else "")
        console.print(
            f"dataset {s.dataset_id}  run {s.run_id}\n"
            f"  rounds {s.rounds}, charges {s.charges}{twice}; mechanisms {s.mechanisms}\n"
            f"  epsilon: run {s.epsilon_run:.3f}, dataset total {s.epsilon_total:.3f}, budget "
            f"{s.budget:g}, remaining {s.remaining:.3f} (delta {s.delta:g})",
            highlight=False, soft_wrap=True, markup=False)
    return 0


def cmd_hospital_audit_verify(args: argparse.Namespace) -> int:
    from client.audit import verify_audit_log

    if not args.log.is_file():
        raise UsageError(f"no audit log at {args.log}: check --log")
    check = verify_audit_log(args.log)
    if check.ok:
        console.print(f"audit log {args.log}: {check.lines} lines, hash chain intact")
        return 0
    console.print(f"[red]audit log {args.log}: line {check.broken_line}[/] {check.reason}",
                  highlight=False)
    return 1


def cmd_hospital_init(args: argparse.Namespace) -> int:
    from client.site_folder import init_site_folder

    config = init_site_folder(args.dir, args.name, args.superlink, args.manifest or "")
    console.print(f"hospital '{config.name}' in {args.dir}: send {args.dir / config.node_pub} to "
                  f"the coordinator; put the consortium's CA certificate at "
                  f"{args.dir / config.ca_cert}; review {args.dir / config.privacy_policy}; "
                  f"fill in {args.dir / config.run_policy} (it refuses every run until you do)")
    return 0


def cmd_hospital_rotate_key(args: argparse.Namespace) -> int:
    from client.site_folder import rotate_node_key

    rotated = rotate_node_key(args.dir)
    console.print(
        f"new node key for '{rotated.name}': {rotated.fingerprint} (old "
        f"{rotated.old_fingerprint}, kept at {rotated.backup_key}).\n"
        f"Send {rotated.node_pub} to the coordinator, who runs:\n"
        f"  medfed coordinator enroll CONSORTIUM --name {rotated.name} --hospital-key "
        f"{rotated.node_pub.name} --replace\n"
        f"and checks that it prints {rotated.fingerprint}. That revokes the old key: a daemon "
        f"still running on it is refused and stops. Then copy the new roster.toml the "
        f"coordinator sends into this folder and start the daemon again (medfed hospital start "
        f"--dir {args.dir}). Delete the backup once the new key is enrolled.",
        markup=False, highlight=False, soft_wrap=True)
    return 0


def cmd_hospital_start(args: argparse.Namespace) -> int:
    import os
    import shlex

    from client.daemon import supernode_command, thread_env, warm_exec_command
    from client.supervisor import supervise
    from server.daemon import daemon_env

    if not args.print_command:
        # A supervisor: restarts the SuperNode (with backoff) until admitted, stops it and its
        # helpers together, and stops for good only when the coordinator revokes this key.
        return supervise(args.dir, insecure=args.insecure, backoff_s=args.retry_backoff,
                         daemon_env=daemon_env)
    # Printing only: a running daemon's secret stays as it is.
    argv = supernode_command(args.dir, insecure=args.insecure, fresh_secret=False)
    warm = warm_exec_command(args.dir, os.getpid())
    home = args.dir.resolve() / "flwr-home"
    if warm is not None:
        console.print(shlex.join(warm[:-1] + ["SUPERNODE_PID"]), markup=False, highlight=False,
                      soft_wrap=True)
    return exec_daemon(argv, True, home, thread_env(args.dir))


def add_hospital(sub: argparse._SubParsersAction) -> None:
    hospital = sub.add_parser("hospital", help="commands a hospital runs next to its images")
    hospital_sub = hospital.add_subparsers(dest="hospital_command", required=True)
    _add_check(hospital_sub)
    _add_daemon_commands(hospital_sub)


def _add_check(hospital_sub: argparse._SubParsersAction) -> None:
    """``medfed hospital check``."""
    check = hospital_sub.add_parser(
        "check", help="read a manifest and its DICOM files once and report what is usable")
    check.add_argument("--dir", type=Path,
                       help="the site folder: check what its hospital.toml names (manifest, "
                            "classes, [site_data]), as the daemon will read it")
    check.add_argument("--manifest", type=Path, help="the CSV manifest (instead of --dir)")
    check.add_argument("--config", type=Path, help="site data TOML ([site_data] table)")
    check.add_argument("--classes", nargs="+", help="class names in label order")
    check.add_argument("--frames", choices=["middle", "all", "volume"])
    check.add_argument("--max-error-fraction", type=float,
                       help="fail above this share of unusable rows (default 0.1)")
    check.add_argument("--image-size", type=int, default=64,
                       help="model input side in pixels; the run's, so the check fills the cache")
    check.add_argument("--cache-dir", help="decoded-image cache folder")
    check.add_argument("--study", type=Path,
                       help="a study file: also dry-run it against this site's policies and "
                            "data, item by item, as the coordinator asks before round 1")
    check.add_argument("--report", type=Path,
                       help="write the full report there: every problem and warning (the "
                            "terminal lists the first 20 of each kind); default with --dir: "
                            f"SITE/{CHECK_REPORT}. It names paths and patients: keep it in "
                            "the hospital")
    check.set_defaults(func=cmd_hospital_check)


def _add_daemon_commands(hospital_sub: argparse._SubParsersAction) -> None:
    """``medfed hospital ledger | audit verify | init | rotate-key | start``."""
    ledger = hospital_sub.add_parser(
        "ledger", help="the hospital's privacy ledger: runs, rounds, epsilon spent, remaining")
    ledger.add_argument("--db", type=Path, required=True, help="the ledger's SQLite file")
    ledger.set_defaults(func=cmd_hospital_ledger)

    audit = hospital_sub.add_parser("audit", help="the hospital's egress audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify", help="check the log's hash chain; name the first edited or missing line")
    verify.add_argument("--log", type=Path, required=True,
                        help="the egress audit log (hospital.toml's audit_log)")
    verify.set_defaults(func=cmd_hospital_audit_verify)

    site_init = hospital_sub.add_parser(
        "init", help="make a hospital's site folder: node key pair, privacy policy, config")
    site_init.add_argument("name", help="the hospital's name, as the coordinator enrols it")
    site_init.add_argument("--dir", type=Path, required=True, help="the site folder to create")
    site_init.add_argument("--superlink", default="localhost:8000",
                           help="the coordinator's Fleet API host:port")
    site_init.add_argument("--manifest", help="the CSV data manifest (can be set later)")
    site_init.set_defaults(func=cmd_hospital_init)

    rotate = hospital_sub.add_parser(
        "rotate-key", help="make a new node key pair (the old one kept as a backup) and say "
                           "what to send to the coordinator")
    rotate.add_argument("--dir", type=Path, required=True, help="the site folder")
    rotate.set_defaults(func=cmd_hospital_rotate_key)

    h_start = hospital_sub.add_parser(
        "start", help="run the hospital's SuperNode (TLS, node key, its node config)")
    h_start.add_argument("--dir", type=Path, required=True, help="the site folder")
    h_start.add_argument("--insecure", action="store_true",
                         help="plaintext, no authentication: refused unless the coordinator "
                         "is on this machine's loopback (tests only)")
    h_start.add_argument("--print-command", action="store_true",
                         help="print the flower-supernode command instead of running it")
    h_start.add_argument("--retry-backoff", type=float, default=1.0,
                         help="first wait (s) before restarting a refused or disconnected "
                              "SuperNode; doubles up to 60 s")
    h_start.set_defaults(func=cmd_hospital_start)
