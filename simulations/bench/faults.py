"""``python -m simulations.bench faults``: the fault-injection suite (``tests/faults/``) on real
processes on loopback, one line per fault, ending with ``faults survived: <n> of <m>``.

Each test injects a fault (``kill -9`` of the coordinator, its SuperLink or a hospital at a
given stage, start order, late enrolment, revocation mid-round, a full disk under a checkpoint)
and passes only when the run finished or failed with a clear reason, nothing was lost, no
process was left running and, where every hospital trained every round, the final adapter
matched the uninterrupted run's. A few tests inject several faults into one run to keep it
cheap (one hospital killed at each SecAgg+ stage, one per round; the coordinator killed in a
SecAgg+ stage and again in an evaluation); a test counts once. Slow: minutes of real daemons.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

SUITE = Path(__file__).resolve().parents[2] / "tests" / "faults"


class _Tally:
    """pytest plugin: each test's outcome and duration, in run order."""

    def __init__(self) -> None:
        self.outcomes: list[tuple[str, str, float, str]] = []

    def pytest_runtest_logreport(self, report) -> None:
        failed_setup = report.when == "setup" and not report.passed
        if report.when == "call" or failed_setup:
            reason = "" if report.passed else str(report.longrepr).strip().splitlines()[-1][:200]
            outcome = "skipped" if report.skipped else "survived" if report.passed else "FAILED"
            self.outcomes.append((report.nodeid.split("::", 1)[-1], outcome, report.duration,
                                  reason))


def main(argv: list[str] | None = None) -> int:
    import pytest

    parser = argparse.ArgumentParser(prog="python -m simulations.bench faults",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", help="only the faults whose test name matches (pytest -k)")
    parser.add_argument("--basetemp", type=Path, help="keep the daemons' folders and logs here")
    args = parser.parse_args(argv)
    tally = _Tally()
    pytest_args = [str(SUITE), "-q", "-p", "no:cacheprovider", "-m", "slow",
                   *(["-k", args.k] if args.k else []),
                   *(["--basetemp", str(args.basetemp)] if args.basetemp else [])]
    started = time.monotonic()
    pytest.main(pytest_args, plugins=[tally])
    for name, outcome, seconds, reason in tally.outcomes:
        print(f"{outcome:9s} {seconds:7.1f} s  {name}" + (f"  ({reason})" if reason else ""))
    survived = sum(outcome == "survived" for _, outcome, _, _ in tally.outcomes)
    print(f"wall time {time.monotonic() - started:.0f} s")
    print(f"faults survived: {survived} of {len(tally.outcomes)}")
    return 0 if tally.outcomes and survived == len(tally.outcomes) else 1
