"""Secure aggregation of adapter updates (SecAgg+, Bell et al., CCS 2020) on Flower's message API.

The pieces both sides share: settings (:mod:`.config`), the neighbour graph (:mod:`.graph`),
key agreement, share encryption, Shamir sharing and mask expansion from well-kept libraries
(:mod:`.crypto`), and the fixed-point encoding of updates (:mod:`.encoding`). The hospital's
side of the protocol is ``client.secure_aggregation``; the coordinator's is
``server.secure_aggregation``.
"""

from privacy.secagg.config import SecAggConfig, SecAggError

__all__ = ["SecAggConfig", "SecAggError"]
