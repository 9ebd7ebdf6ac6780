"""``python -m simulations.bench <name>``: run one benchmark and print its figures."""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHES = {
    "attacks": "simulations.bench.attacks",
    "communication": "simulations.bench.communication",
    "default-run": "simulations.bench.default_run",
    "deploy": "simulations.bench.deploy",
    "dp-head-replay": "simulations.bench.dp_head_replay",
    "dp-overhead": "simulations.bench.dp_overhead",
    "dp-utility": "simulations.bench.dp_utility",
    "faults": "simulations.bench.faults",
    "foundation": "simulations.bench.foundation",
    "foundation-probe": "simulations.bench.foundation_probe",
    "predict": "simulations.bench.predict",
    "real-study": "simulations.bench.real_study",
    "scale": "simulations.bench.scale",
    "secagg": "simulations.bench.secagg",
    "segmentation": "simulations.bench.segmentation",
    "site-data": "simulations.bench.site_data",
    "strategies": "simulations.bench.strategies",
}
"""Bench name -> module with a ``main(argv) -> int``; imported only when run, so one bench's
heavy imports never slow another."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in BENCHES:  # the bench parses the rest, --help included
        return importlib.import_module(BENCHES[argv[0]]).main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m simulations.bench")
    parser.add_argument("name", choices=sorted(BENCHES))
    args, rest = parser.parse_known_args(argv)
    return importlib.import_module(BENCHES[args.name]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
