"""``medfed`` command line. Each subcommand parses its arguments and calls one room."""

from __future__ import annotations

import argparse
import logging
import sys

from rich.logging import RichHandler

from medfed_cli.common import console
from medfed_cli.coordinator import add_coordinator
from medfed_cli.errors import run_command
from medfed_cli.hospital import add_hospital
from medfed_cli.predict import add_predict
from medfed_cli.report import add_report
from medfed_cli.simulate import add_scenarios, add_simulate
from medfed_cli.study import add_study
from medfed_cli.sweep import add_sweep

__all__ = ["build_parser", "console", "main"]


def build_parser() -> argparse.ArgumentParser:
    """``medfed`` and its command groups, each built by its own module."""
    parser = argparse.ArgumentParser(prog="medfed", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Flower's own logs, and an error's full traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_simulate, add_scenarios, add_report, add_sweep, add_study, add_hospital,
                add_coordinator, add_predict):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` names; its exit status (a user's error is one line, a bug's
    traceback is raised on: ``medfed_cli.errors``)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
