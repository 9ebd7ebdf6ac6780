"""Seeded per-(round, hospital) draws of simulated failures (dropouts, stragglers): the same
study and seed make the same hospitals fail in the same rounds on every rerun."""

from __future__ import annotations

import numpy as np


def seeded_draw(probability: float, setting: str, seed: int, server_round: int, hospital: int,
                stream: int) -> bool:
    """True with ``probability`` for this (seed, round, hospital); ``stream`` keeps the kinds
    of failure independent of each other.

    Raises:
        ValueError: ``probability`` outside [0, 1] (the message names ``failures.<setting>``).
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"failures.{setting} must be in [0, 1], got {probability}")
    if probability == 0.0:
        return False
    return bool(np.random.default_rng([seed, server_round, hospital, stream]).random()
                < probability)
