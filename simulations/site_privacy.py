"""Simulated hospitals' privacy settings: one site policy for all, one ledger file each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from client.privacy_round import SitePrivacy, SitePrivacyLoader, site_privacy_from_node_config
from privacy.ledger import Ledger
from privacy.policy import SitePolicy, load_site_policy
from simulations.config import SimulationConfig


@dataclass(frozen=True)
class SimulatedSitePrivacy:
    """``SitePrivacyLoader``: the policy at every hospital, ``<ledger_dir>/hospital-<id>.sqlite``.

    The dataset fingerprint is left to the hospital (a hash of its training data).
    """

    policy: SitePolicy
    ledger_dir: Path

    def __call__(self, context: Context) -> SitePrivacy:
        hospital = int(context.node_config["partition-id"])
        return SitePrivacy(policy=self.policy,
                           ledger=Ledger(self.ledger_dir / f"hospital-{hospital}.sqlite"))


def simulated_site_privacy(config: SimulationConfig) -> SitePrivacyLoader:
    """The hospitals' privacy loader for a simulation: the study's site policy, if it has one."""
    if not config.site_policy:
        return site_privacy_from_node_config
    ledger_dir = Path(config.ledger_dir or Path("runs") / "ledgers")
    return SimulatedSitePrivacy(load_site_policy(Path(config.site_policy)), ledger_dir)
