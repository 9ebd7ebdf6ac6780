"""Server optimisers on the averaged adapter delta (Reddi et al., ICLR 2021) and FedProx.

Flower's FedAdam / FedYogi take the weighted average of the updates, form the delta to the
global adapter and step along it with Adam's / Yogi's moments; FedProx (Li et al., MLSys 2020)
only asks the hospitals for a proximal term (``proximal-mu`` in the round config, read into
``TrainConfig.proximal_mu``). All three use only the weighted sum of the updates.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedProx, FedYogi

from strategies.adapter import AdapterStrategy
from strategies.config import StrategyOptions


def _optimizer_kwargs(options: StrategyOptions | None) -> dict[str, float]:
    options = options or StrategyOptions()
    return {"eta": options.server_lr, "tau": options.server_tau,
            "beta_1": options.beta_1, "beta_2": options.beta_2}


class AdapterFedAdam(AdapterStrategy, FedAdam):
    """Flower's FedAdam on the adapter, with medfed's update checks and reply records."""

    needs_only_sum = True

    def __init__(self, *args, options: StrategyOptions | None = None, **kwargs) -> None:
        super().__init__(*args, options=options, **(_optimizer_kwargs(options) | kwargs))


class AdapterFedYogi(AdapterStrategy, FedYogi):
    """Flower's FedYogi on the adapter, with medfed's update checks and reply records."""

    needs_only_sum = True

    def __init__(self, *args, options: StrategyOptions | None = None, **kwargs) -> None:
        super().__init__(*args, options=options, **(_optimizer_kwargs(options) | kwargs))


class AdapterFedProx(AdapterStrategy, FedProx):
    """Flower's FedProx: FedAvg at the coordinator, a proximal term at the hospitals."""

    needs_only_sum = True

    def __init__(self, *args, options: StrategyOptions | None = None, **kwargs) -> None:
        mu = (options or StrategyOptions()).proximal_mu
        super().__init__(*args, options=options, **({"proximal_mu": mu} | kwargs))
