"""The coordinator's settings for the round loop."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.settings import setting
from privacy.secagg import SecAggConfig
from strategies import STRATEGIES
from strategies.config import StrategyOptions


@dataclass
class FederationConfig:
    """How rounds run.

    Attributes:
        rounds: number of federated rounds.
        strategy: strategy name (see ``strategies.STRATEGIES``).
        fraction_train: share of connected hospitals sampled to train each round.
        fraction_evaluate: share sampled to evaluate the global adapter on their own held-out
            (validation) split after every round; the coordinator combines their results,
            weighted by examples, and chooses the published adapter by them (``[evaluation]``).
        min_hospitals: fewest hospitals a round needs; a round with fewer valid updates fails the
            run (it would not protect anyone's update in a sum, nor represent the consortium).
        round_timeout_s: seconds to wait for replies in a round.
        options: the strategies' settings (``[federation.options]``), e.g. the server
            learning rate of ``fedadam`` or the update norm bound every rule applies.
        secure_aggregation: SecAgg+ settings (``[federation.secure_aggregation]``); with
            ``enabled`` the coordinator only ever sees the sum of the hospitals' updates.
        task: what the study is for, as the consortium names it (e.g. ``"pneumonia-cxr"``);
            declared to the hospitals in every message (``task``) so that a hospital's run
            policy can allow only the tasks its approvals cover. Empty: undeclared.
        initial_adapter: start round 1 from this saved adapter (a ``models.adapters.save_adapter``
            directory or its safetensors file) instead of freshly initialised LoRA factors and
            head: e.g. one trained on public data of the same kind (``python -m
            simulations.public_start``). It must fit the run's backbone, rank and targets. Empty:
            fresh. Relative paths are from the coordinator's working directory.
        initial_adapter_sha256: pinned SHA-256 of that file; the run refuses another file. Empty:
            filled in from the file when the run starts, and recorded in its ``config.toml``.
    """

    rounds: int = setting(4, ge=1)
    strategy: str = setting("fedavg", choices=tuple(sorted(STRATEGIES)))
    fraction_train: float = setting(1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = setting(1.0, ge=0.0, le=1.0)
    min_hospitals: int = setting(2, ge=1)
    round_timeout_s: float = setting(1800.0, gt=0.0)
    options: StrategyOptions = field(default_factory=StrategyOptions)
    secure_aggregation: SecAggConfig = field(default_factory=SecAggConfig)
    task: str = ""
    initial_adapter: str = ""
    initial_adapter_sha256: str = ""

    def __post_init__(self) -> None:
        # The reader checks each field's limits (rounds >= 1, a known strategy); what is left
        # is the check across fields, when the file is read, not rounds later.
        if self.secure_aggregation.enabled and not STRATEGIES[self.strategy].needs_only_sum:
            # Refused, not degraded: this rule must see each hospital's update, which secure
            # aggregation exists to hide.
            names = sorted(n for n, s in STRATEGIES.items() if s.needs_only_sum)
            raise ValueError(
                f"federation.strategy '{self.strategy}' needs each hospital's update and cannot "
                f"run under secure aggregation; use one that needs only the sum: {names}")
