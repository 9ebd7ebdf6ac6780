"""Rules that survive a faulty or hostile hospital: they need each update, not only the sum.

- ``median``: coordinate-wise median (Yin et al., ICML 2018; Flower's FedMedian).
- ``trimmed-mean``: coordinate-wise mean after cutting ``trim_fraction`` of the updates at each
  end (Flower's FedTrimmedAvg).
- ``norm-bound``: each update ``new - global`` is scaled down to a norm bound before weighted
  averaging (Sun et al., 2019, "Can you really backdoor federated learning?"); the bound is
  ``clip_norm`` or, when 0, the median norm of the round's updates.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg

from strategies.adapter import AdapterStrategy
from strategies.config import StrategyOptions
from strategies.fedavg import AdapterFedAvg
from strategies.replies import update_norm

logger = logging.getLogger(__name__)


class AdapterFedMedian(AdapterStrategy, FedMedian):
    """Coordinate-wise median of the adapter updates (unweighted)."""

    needs_only_sum = False


class AdapterTrimmedMean(AdapterStrategy, FedTrimmedAvg):
    """Coordinate-wise trimmed mean of the adapter updates (unweighted)."""

    needs_only_sum = False

    def __init__(self, *args, options: StrategyOptions | None = None, **kwargs) -> None:
        beta = (options or StrategyOptions()).trim_fraction
        super().__init__(*args, options=options, **({"beta": beta} | kwargs))


def clip_update(update: ArrayRecord, reference: ArrayRecord, bound: float) -> ArrayRecord:
    """``reference + (update - reference) * min(1, bound / ||update - reference||)``."""
    norm = update_norm(update, reference)
    scale = 1.0 if norm <= bound or norm == 0 else bound / norm
    clipped = ArrayRecord()
    for name, array in update.items():
        ref = reference[name].numpy()
        value = ref + (array.numpy() - ref) * scale
        clipped[name] = Array(np.asarray(value, dtype=array.numpy().dtype))
    return clipped


class AdapterNormBound(AdapterFedAvg):
    """Weighted FedAvg of updates whose norms are first bounded (see module docstring)."""

    needs_only_sum = False

    def prepare_updates(self, server_round: int, valid: list[Message]) -> list[Message]:
        if self._global is None or not valid:
            return valid
        reference = self.exchanged(self._global)
        norms = [update_norm(m.content["arrays"], reference) for m in valid]
        bound = self.options.clip_norm or float(np.median(norms))
        for msg, norm in zip(valid, norms, strict=True):
            if norm > bound:
                logger.info("round %d: update of node %d scaled from norm %.4g to %.4g",
                            server_round, msg.metadata.src_node_id, norm, bound)
            msg.content["arrays"] = clip_update(msg.content["arrays"], reference, bound)
        return valid
