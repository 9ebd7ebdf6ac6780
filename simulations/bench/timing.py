"""Round timing shared by the benchmarks that run whole studies."""

from __future__ import annotations

import time
from statistics import median
from typing import Any

from rich.console import Console

from simulations.config import SimulationConfig


def timed_study(config: SimulationConfig) -> tuple[dict[str, Any], list[float]]:
    """Run ``config`` quietly; its summary and each round's wall time in seconds.

    A round's time runs from the previous central evaluation to its own, so round 1 also
    holds Ray's start-up (actors, model builds): see :func:`steady_round_s`.
    """
    from simulations.runner import run_study

    marks: list[float] = []
    summary = run_study(config, Console(quiet=True),
                        on_round=lambda _r, _m: marks.append(time.monotonic()))
    # marks[0]: round 0's evaluation of the initial adapter; marks[k]: end of round k.
    return summary, [b - a for a, b in zip(marks, marks[1:], strict=False)]


def steady_round_s(rounds: list[float]) -> float:
    """Median round time over rounds 2.. (round 1 alone when there is no other)."""
    return median(rounds[1:]) if len(rounds) > 1 else rounds[0]
