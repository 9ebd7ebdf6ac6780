"""Privacy accounting with opacus' accountants, over a history that outlives any one process.

A history is a list of :data:`Event` ``(noise_multiplier, sample_rate, steps)``: a subsampled
Gaussian mechanism run ``steps`` times. That is exactly what opacus' RDP and PRV accountants keep
in ``accountant.history``, so composing over rounds, runs and processes means keeping the events
(in the ClientApp's ``context.state`` and in the ledger) and rebuilding the accountant from them.
"""

from __future__ import annotations

import logging
import math

from flwr.app import ConfigRecord
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

logger = logging.getLogger(__name__)

PRV_MIN_NOISE = 0.25
"""Smallest noise multiplier handed to opacus' PRV accountant. Its grid grows without bound as
the noise shrinks (memory and time: docs/decisions/008-rdp-below-small-noise.md). Below this
floor the RDP accountant answers instead: a valid upper bound, looser than PRV."""

MAX_NOISE_MULTIPLIER = 1000.0
"""Largest noise multiplier a hospital takes from a coordinator (``client.round_config``) and
hands to an accountant: an infinite one makes opacus' accountants spin forever, and past this
the epsilon no longer falls (the RDP orders' floor). :func:`epsilon` accounts a larger one as
this (a valid upper bound: epsilon falls as the noise grows)."""

Event = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, steps)`` of one run of the subsampled Gaussian mechanism."""


def epsilon(history: list[Event], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of all events composed; 0 for an empty history.

    Args:
        history: events in any order (composition is commutative).
        delta: target delta, in (0, 1).
        accountant: ``rdp`` or ``prv``.
    """
    events = [(float(z), float(q), int(n)) for z, q, n in history if n > 0]
    if not events:
        return 0.0
    if any(not (math.isfinite(z) and math.isfinite(q)) for z, q, _ in events) or not (
            0 < delta < 1):
        # A NaN or infinite event would make the accountant spin (inf) or answer NaN.
        raise ValueError("accounting refused: a noise multiplier, sample rate or delta is "
                         "not a finite number in range")
    events = [(min(z, MAX_NOISE_MULTIPLIER), q, n) for z, q, n in events]
    if any(z <= 0 for z, _, _ in events):
        return math.inf
    if accountant == "prv" and any(z < PRV_MIN_NOISE for z, _, _ in events):
        logger.warning("noise multiplier below %g: epsilon from the RDP accountant (an upper "
                       "bound) instead of PRV, whose memory grows without bound as noise "
                       "vanishes", PRV_MIN_NOISE)
        accountant = "rdp"
    acc = create_accountant(accountant)
    acc.history = events
    return float(acc.get_epsilon(delta))


def noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """Smallest noise multiplier whose ``steps`` steps at ``sample_rate`` spend ``target_epsilon``.

    opacus' ``get_noise_multiplier`` (bisection on the accountant, tolerance 0.005 in epsilon).
    With PRV, a target so loose that RDP already meets it with less than twice
    :data:`PRV_MIN_NOISE` takes RDP's answer (more noise than PRV's, so still within the
    target): PRV's bisection would probe noise levels it cannot handle.
    """
    for value in (target_epsilon, delta, sample_rate):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"noise search refused: {value} is not a finite positive number")
    if accountant == "prv":
        rdp_noise = noise_for_target(target_epsilon, delta, sample_rate, steps, "rdp")
        if rdp_noise < 2 * PRV_MIN_NOISE:
            return rdp_noise
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps,
                                      accountant=accountant, epsilon_tolerance=0.005))


def history_to_record(history: list[Event]) -> ConfigRecord:
    """Events as a ConfigRecord (three parallel lists), for the ClientApp's ``context.state``."""
    return ConfigRecord({
        "noise-multiplier": [float(z) for z, _, _ in history],
        "sample-rate": [float(q) for _, q, _ in history],
        "steps": [int(n) for _, _, n in history],
    })


def history_from_record(record: ConfigRecord | None) -> list[Event]:
    """Inverse of :func:`history_to_record`; ``None`` gives an empty history."""
    if record is None:
        return []
    return [(float(z), float(q), int(n)) for z, q, n in
            zip(record["noise-multiplier"], record["sample-rate"], record["steps"], strict=True)]
