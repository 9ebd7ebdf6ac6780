"""``medfed sweep``: one simulation per point of a grid."""

from __future__ import annotations

import argparse
from pathlib import Path

from medfed_cli.common import console, quiet_flower
from medfed_cli.simulate import base_config


def cmd_sweep(args: argparse.Namespace) -> int:
    from simulations.sweep import parse_grid, run_sweep

    quiet_flower(args.verbose)
    base = base_config(args, {"baselines": []} if args.no_baselines else {})
    table = run_sweep(base, parse_grid(args.grid), args.out, console)
    console.print(table.to_string(index=False), soft_wrap=True, markup=False)
    console.print(f"sweep results: {args.out / 'sweep.csv'}; "
                  f"compare with: medfed report {args.out}/*/ --out {args.out / 'report'}")
    return 0


def add_sweep(sub: argparse._SubParsersAction) -> None:
    swp = sub.add_parser("sweep", help="one simulation per point of a grid, each in its own "
                                       "folder")
    swp.add_argument("--scenario", help="base study: a named scenario or a .toml file")
    swp.add_argument("--config", type=Path, help="base study: a TOML config file")
    swp.add_argument("--grid", action="append", required=True, metavar="SECTION.KEY=V1,V2",
                     help="a setting and its values, e.g. data.num_hospitals=3,5 (repeatable)")
    swp.add_argument("--out", type=Path, required=True, help="sweep folder")
    swp.add_argument("--no-baselines", action="store_true", help="skip pooled/local baselines")
    swp.set_defaults(func=cmd_sweep)
