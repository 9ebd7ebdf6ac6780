"""Settings of secure aggregation (``[federation.secure_aggregation]`` in a study TOML)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.errors import MedfedError
from core.settings import check_settings, setting

STAGES = ("setup", "share", "mask", "check", "unmask")
"""The protocol's message exchanges, in order (one round trip each)."""
ACTION = "secagg"
"""Flower message action of the stages: messages are of type ``train.secagg``."""


class SecAggError(MedfedError, RuntimeError):
    """A secure-aggregation round that cannot complete (too few hospitals, failed unmasking)."""


@dataclass
class SecAggConfig:
    """How updates are masked, shared and quantised.

    Attributes:
        enabled: run every training round under secure aggregation.
        group_size: how many hospitals each hospital's secrets are shared among - itself plus
            its neighbours in the SecAgg+ graph, one Shamir share each - as a count of hospitals
            (at least 3); 0: every hospital sampled in the round (the original SecAgg).
        threshold: shares needed to reconstruct a secret; a value <= 1 is a fraction of the
            group. Always raised to more than half of the group, so that the coordinator can
            never hold both a hospital's self-mask and its masking key. Each hospital raises
            it further to a majority of the peers it verified and enforces its own minimum
            group (``client.secure_aggregation``): the coordinator's value is a proposal.
        clipping_range: each coordinate of a hospital's (weighted) update ``new - global`` is
            clipped to ``[-clipping_range, clipping_range]`` before quantisation. Adapter steps
            are small (about 1e-2 per round); with client-level DP the range is widened to hold
            the hospitals' noise (see ``server.secure_aggregation``).
        quantization_bits: levels per coordinate are ``2**quantization_bits``; the step is
            ``2 * clipping_range / (2**quantization_bits - 1)``.
        modulus_bits: masked values live in ``Z / 2**modulus_bits`` (at most 32: uint32 on the
            wire, the size of float32 updates). The sum of all hospitals' quantised values must
            fit: ``hospitals * (2**quantization_bits - 1) < 2**modulus_bits``.
        max_weight: cap on a hospital's averaging weight (its example count, or 1 under
            client-level DP); 0 uses the largest weight the round's hospitals declared.
        stage_timeout_s: seconds to wait for the replies of the share and unmask stages (pure
            cryptography: a hospital silent this long has dropped out); setup (where a
            hospital may first load its data) and masked input (where it trains) wait for the
            round timeout.
    """

    enabled: bool = False
    group_size: int = setting(0, ge=0)
    threshold: float = setting(0.6, gt=0)
    clipping_range: float = setting(1.0, gt=0)
    quantization_bits: int = setting(20, ge=2, le=31)
    modulus_bits: int = setting(32, ge=3, le=32)
    max_weight: float = setting(0.0, ge=0)
    stage_timeout_s: float = setting(300.0, gt=0)

    def __post_init__(self) -> None:
        # Each field's limits (the typed reader checks them when a study file is read), then
        # the settings that only work together.
        check_settings(self, "secure_aggregation")
        if self.group_size in (1, 2):
            raise ValueError(f"group_size = {self.group_size}: use a count of hospitals >= 3, "
                             "or 0 for every hospital in the round")
        if self.threshold > 1 and self.threshold != int(self.threshold):
            raise ValueError(f"threshold = {self.threshold:g}: use a count of shares (a whole "
                             "number > 1) or a fraction in (0, 1]")
        if self.quantization_bits >= self.modulus_bits:
            raise ValueError(f"quantization_bits = {self.quantization_bits} must be below "
                             f"modulus_bits = {self.modulus_bits}")

    def group_count(self, hospitals: int) -> int:
        """Hospitals per share group (the hospital and its neighbours; shares per secret)
        among ``hospitals``."""
        count = int(self.group_size) or hospitals
        count = max(2, min(count, hospitals))
        if count < hospitals and count % 2 == 0:
            count += 1  # the ring graph gives each hospital an even number of neighbours
        return count

    def threshold_count(self, hospitals: int) -> int:
        """Shares needed to reconstruct a secret, among ``hospitals``."""
        group = self.group_count(hospitals)
        count = (math.ceil(self.threshold * group) if self.threshold <= 1
                 else int(self.threshold))
        return max(count, group // 2 + 1)

    def check(self, hospitals: int) -> None:
        """Refuse settings that cannot protect or cannot fit ``hospitals`` hospitals.

        Raises:
            SecAggError: too few hospitals, a threshold above the shares, or a sum that
                overflows the modulus.
        """
        if hospitals < 2:
            raise SecAggError(f"secure aggregation needs at least 2 hospitals, got {hospitals}")
        group, threshold = self.group_count(hospitals), self.threshold_count(hospitals)
        if threshold > group:
            raise SecAggError(f"secure_aggregation.threshold={self.threshold} asks for "
                              f"{threshold} shares, but each secret has only {group}")
        levels = 2**self.quantization_bits - 1
        if hospitals * levels >= 2**self.modulus_bits:
            raise SecAggError(
                f"{hospitals} hospitals x {levels} quantisation levels overflow the modulus "
                f"2**{self.modulus_bits}: lower secure_aggregation.quantization_bits")
