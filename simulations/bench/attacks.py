"""``python -m simulations.bench attacks``: run every adversarial test and count the attacks
that succeeded.

Each test under ``tests/adversarial/`` mounts one attack on real components and asserts that it
fails. The bench runs them with pytest in a subprocess (JUnit XML in a temporary folder, no
cache written into the repository) and prints one line per attack:

- a test that passes: ``attack <name>: failed (defended)``;
- a test that fails or errors: ``attack <name>: succeeded``;
- a skipped test: ``attack <name>: succeeded (skipped: not defended until it runs)``.

It ends with ``attacks that succeeded: <n> of <m>`` and exits 1 when ``n > 0``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ATTACKS_DIR = ROOT / "tests" / "adversarial"


@dataclass(frozen=True)
class Outcome:
    """One attack (one test) and how it ended.

    Attributes:
        name: ``<file stem>::<test name>``.
        result: ``defended``, ``succeeded`` or ``skipped``.
        detail: the failure or skip message's first line ("" when defended).
    """

    name: str
    result: str
    detail: str = ""

    @property
    def attack_succeeded(self) -> bool:
        return self.result != "defended"


def read_junit(path: Path) -> list[Outcome]:
    """The outcome of every test case in a JUnit XML report, in report order."""
    outcomes = []
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        name = f"{module}::{case.get('name', '?')}"
        result, detail = "defended", ""
        for tag, label in (("failure", "succeeded"), ("error", "succeeded"),
                           ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                result = label
                detail = (found.get("message") or found.text or "").strip().splitlines()[:1]
                detail = detail[0][:160] if detail else ""
                break
        outcomes.append(Outcome(name, result, detail))
    return outcomes


def run_attacks(paths: list[str], extra: list[str]) -> tuple[list[Outcome], int]:
    """Run pytest on ``paths``; returns the outcomes and pytest's exit code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("FLWR_HOME", str(ROOT / ".flwr"))
    with tempfile.TemporaryDirectory(prefix="medfed-attacks-") as tmp:
        report = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={report}", "-o", "junit_family=xunit2", *paths, *extra]
        done = subprocess.run(command, cwd=ROOT, env=env, check=False)
        if not report.exists():
            return [], done.returncode
        return read_junit(report), done.returncode


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench attacks",
        description="Run the adversarial tests (tests/adversarial/): one test is one attack; "
                    "a failing or skipped test is an attack that succeeded.")
    parser.add_argument("paths", nargs="*", default=[str(ATTACKS_DIR)],
                        help="test files or folders (default: tests/adversarial)")
    parser.add_argument("-k", dest="keyword", default="",
                        help="only attacks whose name matches (pytest -k)")
    args = parser.parse_args(argv)
    extra = ["-k", args.keyword] if args.keyword else []
    outcomes, code = run_attacks(args.paths, extra)
    if not outcomes:
        print(f"no attacks ran (pytest exit code {code})")
        return 1
    for outcome in outcomes:
        if outcome.result == "defended":
            line = "failed (defended)"
        elif outcome.result == "skipped":
            line = f"succeeded (skipped, so not defended: {outcome.detail})"
        else:
            line = f"succeeded ({outcome.detail})" if outcome.detail else "succeeded"
        print(f"attack {outcome.name}: {line}", flush=True)
    succeeded = sum(o.attack_succeeded for o in outcomes)
    print(f"attacks that succeeded: {succeeded} of {len(outcomes)}", flush=True)
    return 1 if succeeded else 0
