"""``python -m simulations.bench default-run``: the default simulation, timed as a user runs it.

Runs ``medfed simulate`` with the defaults (baselines included) as a separate process, as
``bash scripts/simulate.sh`` does once installed, and prints the wall-clock seconds from its
start to its exit and the federated test AUC it wrote. Extra arguments go to ``medfed
simulate`` (e.g. ``--seed 1``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench default-run",
                                     description=__doc__)
    parser.add_argument("--run-dir", type=Path,
                        help="where the run goes (default: a temporary folder, removed after)")
    args, simulate_args = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="medfed-default-run-") as scratch:
        run_dir = args.run_dir or Path(scratch) / "run"
        command = [sys.executable, "-m", "medfed_cli.main", "simulate", "--run-dir",
                   str(run_dir), *simulate_args]
        started = time.monotonic()
        done = subprocess.run(command)
        seconds = time.monotonic() - started
        if done.returncode != 0:
            print(f"medfed simulate failed with exit code {done.returncode}", file=sys.stderr)
            return done.returncode
        summary = json.loads((run_dir / "summary.json").read_text())
    print(f"default run seconds: {seconds:.1f}")
    print(f"federated test auc: {summary['federated']['auc']:.4f}")
    for name, value in summary.get("wall_time_s", {}).items():
        print(f"{name} seconds: {value:.1f}")
    return 0
