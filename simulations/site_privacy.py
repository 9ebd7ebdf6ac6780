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

    Each hospital declares its dataset as ``<dataset>-hospital-<id>``, as a real hospital
    declares ``dataset_id``. ``insecure_replayable_noise`` comes from the study's settings.
    """

    policy: SitePolicy | None
    ledger_dir: Path
    dataset: str = ""
    insecure_replayable_noise: bool = False

    def __call__(self, context: Context) -> SitePrivacy:
        hospital = int(context.node_config["partition-id"])
        ledger = (Ledger(self.ledger_dir / f"hospital-{hospital}.sqlite")
                  if self.policy is not None else None)
        return SitePrivacy(policy=self.policy, ledger=ledger,
                           dataset_id=f"{self.dataset}-hospital-{hospital}",
                           insecure_replayable_noise=self.insecure_replayable_noise)


def simulated_site_privacy(config: SimulationConfig) -> SitePrivacyLoader:
    """The hospitals' privacy loader for a simulation: the study's site policy, if it has one,
    and its ``insecure_replayable_noise`` setting."""
    if not config.site_policy and not config.insecure_replayable_noise:
        return site_privacy_from_node_config
    ledger_dir = Path(config.ledger_dir or Path("runs") / "ledgers")
    policy = load_site_policy(Path(config.site_policy)) if config.site_policy else None
    return SimulatedSitePrivacy(policy, ledger_dir, config.data.dataset,
                                config.insecure_replayable_noise)
