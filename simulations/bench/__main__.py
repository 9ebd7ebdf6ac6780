"""``python -m simulations.bench <name>``: run one benchmark and print its figures."""

from __future__ import annotations

import argparse
import sys

from simulations.bench import (
    communication,
    deploy,  # issue 6
    dp_overhead,
    dp_utility,  # issue 4
    scale,
    secagg,
    site_data,
    strategies,
)

BENCHES = {"communication": communication.main, "scale": scale.main, "site-data": site_data.main,
           "dp-overhead": dp_overhead.main, "strategies": strategies.main}
BENCHES["dp-utility"] = dp_utility.main  # issue 4
BENCHES["deploy"] = deploy.main  # issue 6
BENCHES["secagg"] = secagg.main  # issue 5


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in BENCHES:  # the bench parses the rest, --help included
        return BENCHES[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(prog="python -m simulations.bench")
    parser.add_argument("name", choices=sorted(BENCHES))
    args, rest = parser.parse_known_args(argv)
    return BENCHES[args.name](rest)


if __name__ == "__main__":
    sys.exit(main())
