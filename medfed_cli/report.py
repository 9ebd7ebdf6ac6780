"""``medfed report``: an HTML report of one or more runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from medfed_cli.common import console


def cmd_report(args: argparse.Namespace) -> int:
    from simulations.report import build_report, default_out_dir

    path = build_report(args.run_dirs, args.out or default_out_dir(args.run_dirs),
                        score_model=not args.no_model)
    if args.tensorboard:
        from simulations.report import load_run
        from simulations.tracking import write_tensorboard

        for run_dir in args.run_dirs:
            write_tensorboard(load_run(run_dir), args.tensorboard)
        console.print(f"TensorBoard: tensorboard --logdir {args.tensorboard}")
    console.print(f"report: {path} (figures in {path.parent / 'figures'})")
    return 0


def add_report(sub: argparse._SubParsersAction) -> None:
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
