"""The coordinator's settings for the round loop."""

from __future__ import annotations

from dataclasses import dataclass, field

from strategies.config import StrategyOptions


@dataclass
class FederationConfig:
    """How rounds run.

    Attributes:
        rounds: number of federated rounds.
        strategy: strategy name (see ``strategies.STRATEGIES``).
        fraction_train: share of connected hospitals sampled to train each round.
        fraction_evaluate: share sampled to evaluate the global adapter on their validation data.
        min_hospitals: fewest hospitals a round needs; a round with fewer valid updates fails the
            run (it would not protect anyone's update in a sum, nor represent the consortium).
        round_timeout_s: seconds to wait for replies in a round.
        options: the strategies' settings (issue 7; ``[federation.options]``), e.g. the server
            learning rate of ``fedadam`` or the update norm bound every rule applies.
    """

    rounds: int = 4
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_hospitals: int = 2
    round_timeout_s: float = 1800.0
    options: StrategyOptions = field(default_factory=StrategyOptions)

    def __post_init__(self) -> None:
        # Issue 7: refuse an unknown strategy when the config is read, not rounds later.
        from strategies import STRATEGIES

        if self.strategy not in STRATEGIES:
            raise ValueError(f"federation.strategy: unknown strategy '{self.strategy}': "
                             f"choose one of {sorted(STRATEGIES)}")
