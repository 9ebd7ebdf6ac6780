"""``medfed coordinator ...``: what the consortium's coordinator runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from medfed_cli.common import UsageError, console, exec_daemon


def cmd_coordinator_init(args: argparse.Namespace) -> int:
    from server.consortium import init_consortium

    config = init_consortium(args.dir, args.consortium, args.hostname, args.host, args.port,
                             args.admin_port)
    console.print(f"consortium '{config.consortium}' in {args.dir}: CA {config.ca_cert} (give "
                  f"it to every hospital), TLS {config.server_cert}, enrolment list "
                  f"{config.enrolment} (empty)")
    return 0


ROSTER_NOTE = ("give roster.toml (the CA-signed list of enrolled hospitals) and ca/ca.pem to "
               "every hospital: secure aggregation counts only hospitals on the roster")


def _roster_outcome(folder: Path) -> int:
    """Say what became of the roster after an enrolment change: 0 when it was re-signed here,
    1 (with exactly what to do) when the CA key is offline and it was not."""
    from server.consortium import ca_key_here, current_roster, roster_offline_message

    if ca_key_here(folder) is None:
        console.print(f"[red]error:[/] {escape(roster_offline_message(folder))}", highlight=False,
                      soft_wrap=True)
        return 1
    roster = current_roster(folder)
    if roster is not None:
        console.print(f"roster serial {roster.serial}, expires {roster.expires_at}; "
                      f"{ROSTER_NOTE}")
    return 0


def _sync_running(folder: Path) -> int:
    """After an enrolment change: a running SuperLink's registry follows the enrolment list
    now (a late joiner can take part in the run under way; a revoked key's next request is
    refused). 0: done, or nothing running (the next 'coordinator start' syncs before it
    listens); 1: an error, printed."""
    from server.daemon import coordinator_running, run_flwr, sync_registry

    if not coordinator_running(folder):
        return 0  # the next 'coordinator start' syncs it before it listens
    lines = sync_registry(folder, run_flwr)
    for line in lines:
        console.print(line, markup=False)
    return 1 if any(line.startswith("error:") for line in lines) else 0


def cmd_coordinator_enroll(args: argparse.Namespace) -> int:
    from server.consortium import enrol, replace_key

    if args.replace:
        old, entry = replace_key(args.dir, args.name, args.hospital_key)
        console.print(f"hospital '{entry.name}': key {entry.fingerprint} enrolled, its old key "
                      f"{old.fingerprint} revoked")
        synced = _sync_running(args.dir)  # the old key is refused from now on
        return max(_roster_outcome(args.dir), synced)
    entry = enrol(args.dir, args.name, args.hospital_key)
    console.print(f"enrolled hospital '{entry.name}' ({entry.fingerprint})")
    synced = _sync_running(args.dir)  # a late joiner can take part in the run under way
    return max(_roster_outcome(args.dir), synced)


def cmd_coordinator_revoke(args: argparse.Namespace) -> int:
    from server.consortium import revoke

    entry = revoke(args.dir, args.name)
    console.print(f"revoked hospital '{entry.name}' ({entry.fingerprint}) at {entry.revoked_at}")
    # The running SuperLink forgets the key now: the hospital's next request is refused.
    synced = _sync_running(args.dir)
    return max(_roster_outcome(args.dir), synced)


def cmd_coordinator_sign_roster(args: argparse.Namespace) -> int:
    from server.consortium import sign_roster

    roster = sign_roster(args.dir, args.ca_key, args.valid_days)
    console.print(f"signed {args.dir / 'roster.toml'}: serial {roster.serial}, expires "
                  f"{roster.expires_at}, hospitals {', '.join(sorted(roster.keys)) or 'none'}; "
                  f"copy it to the coordinator's consortium folder (if this is a copy) and to "
                  f"every hospital's site folder")
    return 0


def cmd_coordinator_hospitals(args: argparse.Namespace) -> int:
    from server.consortium import load_enrolments

    entries = load_enrolments(args.dir)
    table = Table(title=f"hospitals of {args.dir}")
    for column in ("name", "fingerprint", "enrolled", "revoked"):
        table.add_column(column)
    for e in entries:
        table.add_row(e.name, e.fingerprint[:23] + "...", e.enrolled_at, e.revoked_at or "-")
    console.print(table)
    return 0


def cmd_coordinator_start(args: argparse.Namespace) -> int:
    from server.consortium import roster_warning
    from server.daemon import flwr_cli_home, run_coordinator, superlink_command

    warning = roster_warning(args.dir) if (args.dir / "roster.toml").exists() else None
    if warning is not None:  # secure aggregation refuses such a roster
        console.print(f"[yellow]roster:[/] {escape(warning)}", soft_wrap=True)
    if args.study is not None and not args.print_command:
        if not args.study.is_file():
            raise UsageError(f"study file {args.study} does not exist")
        return run_coordinator(args.dir, args.study, args.run_dir, insecure=args.insecure)
    argv = superlink_command(args.dir, insecure=args.insecure)
    home = flwr_cli_home(args.dir, insecure=args.insecure)
    return exec_daemon(argv, args.print_command, home)


def cmd_coordinator_register(args: argparse.Namespace) -> int:
    import subprocess

    from server.daemon import sync_registry

    def run(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        return done.returncode, done.stdout + done.stderr

    lines = sync_registry(args.dir, run)
    for line in lines or ["the SuperLink's registry matches the enrolment list"]:
        console.print(line, markup=False)
    return 1 if any(line.startswith("error:") for line in lines) else 0


def cmd_coordinator_status(args: argparse.Namespace) -> int:
    import subprocess

    from server.consortium import roster_warning
    from server.daemon import registry_listing_command
    from server.status import hospital_statuses, run_statuses

    if (warning := roster_warning(args.dir)) is not None:
        console.print(f"[yellow]roster:[/] {escape(warning)}", soft_wrap=True)
    argv, env = registry_listing_command(args.dir)
    listing = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    hospitals = hospital_statuses(args.dir, listing.stdout)
    runs = run_statuses(args.dir)
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


def add_coordinator(sub: argparse._SubParsersAction) -> None:
    coordinator = sub.add_parser("coordinator", help="commands the consortium's coordinator runs")
    coordinator_sub = coordinator.add_subparsers(dest="coordinator_command", required=True)
    c_init = coordinator_sub.add_parser(
        "init", help="make a consortium folder: CA, TLS certificate, config, enrolment list")
    c_init.add_argument("dir", type=Path, help="the consortium folder to create")
    c_init.add_argument("--consortium", default="medfed", help="the consortium's name")
    c_init.add_argument("--hostname", action="append", default=[],
                        help="a name or IP hospitals reach the coordinator by (repeatable)")
    c_init.add_argument("--host", default="0.0.0.0",
                        help="address the SuperLink's Fleet API (for hospitals) listens on")
    c_init.add_argument("--port", type=int, default=8000,
                        help="the Fleet API's port (the only API hospitals can reach)")
    c_init.add_argument("--admin-port", type=int, default=0,
                        help="loopback port of the run-submission, registry and ServerApp APIs "
                             "(default: --port + 1)")
    c_init.set_defaults(func=cmd_coordinator_init)

    _add_enrolment_commands(coordinator_sub)

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


def _add_enrolment_commands(coordinator_sub: argparse._SubParsersAction) -> None:
    """``enroll``, ``sign-roster`` and ``revoke``: what changes who counts as a hospital."""
    c_enroll = coordinator_sub.add_parser("enroll", help="enrol a hospital's public key")
    c_enroll.add_argument("dir", type=Path, help="the consortium folder")
    c_enroll.add_argument("--hospital-key", type=Path, required=True,
                          help="the hospital's node.pub (from 'medfed hospital init')")
    c_enroll.add_argument("--name", required=True, help="the hospital's name")
    c_enroll.add_argument("--replace", action="store_true",
                          help="swap the hospital's enrolled key for this one (after 'medfed "
                               "hospital rotate-key'): the old key is revoked")
    c_enroll.set_defaults(func=cmd_coordinator_enroll)

    c_sign = coordinator_sub.add_parser(
        "sign-roster", help="re-sign roster.toml (serial + 1, new expiry) with the CA key; run "
                            "it where the CA key is kept")
    c_sign.add_argument("dir", type=Path,
                        help="the consortium folder, or a copy of its coordinator.toml, "
                             "enrolment.toml, ca/ca.pem and roster.toml")
    c_sign.add_argument("--ca-key", type=Path,
                        help="the CA private key (default: DIR's ca/ca.key)")
    c_sign.add_argument("--valid-days", type=float,
                        help="how long the roster is valid (default: coordinator.toml's "
                             "roster_valid_days, 30)")
    c_sign.set_defaults(func=cmd_coordinator_sign_roster)

    c_revoke = coordinator_sub.add_parser("revoke", help="revoke a hospital's enrolment")
    c_revoke.add_argument("dir", type=Path, help="the consortium folder")
    c_revoke.add_argument("--name", required=True, help="the hospital's name")
    c_revoke.set_defaults(func=cmd_coordinator_revoke)
