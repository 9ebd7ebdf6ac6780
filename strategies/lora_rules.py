"""LoRA-aware rules: which factor is averaged, which is frozen or kept (``models.lora_parts``).

- ``ffa-lora`` (Sun et al., ICLR 2024): A frozen at the shared seeded initialisation the
  coordinator sends in round 1, only B and the head are trained and sent; the average of the B's
  is then exactly the average of the updates ``B @ A``, at about half the LoRA upload.
- ``fedsa-lora`` (Guo et al., ICLR 2025): A and the head are shared and averaged, B stays at
  each hospital between rounds (personalisation); the hospitals' validation metrics are those of
  their personalised adapters, the coordinator's test metrics those of the shared part (B at its
  initial value).
- ``hetlora`` (Cho et al., EMNLP 2024): hospitals with less compute train lower LoRA ranks. The
  coordinator keeps the global adapter at the largest rank (the run's ``lora_r``); a hospital of
  rank ``r`` uses the first ``r`` rows of each A and columns of each B, and its reply is
  zero-padded back to the global rank before the example-weighted average (so rank components
  only some hospitals train are shrunk towards 0 by the others' zeros, as in the paper's
  zero-padding). Scaling: the paper writes a client's update as ``B_k @ A_k`` with no
  rank-dependent factor (its aggregation weights come from ``||B_k @ A_k||_F``), i.e. the same
  scale at every rank; peft multiplies by ``lora_alpha / r``, so a rank-``r`` hospital uses
  ``alpha * r / r_global`` and its update means the same thing in the global adapter. Not
  implemented: the paper's rank self-pruning and sparsity-weighted aggregation (the latter
  needs each hospital's update norm, not only the sum). The padding happens at the hospital, so
  the rule needs only the weighted sum; the upload is the global rank's size (zeros included).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from strategies.fedavg import AdapterFedAvg


class FFALoRA(AdapterFedAvg):
    """FedAvg of B and the head, with A frozen everywhere."""

    needs_only_sum = True
    exchange = "ffa"


class FedSALoRA(AdapterFedAvg):
    """FedAvg of A and the head; each hospital keeps its own B."""

    needs_only_sum = True
    exchange = "fedsa"


class HetLoRA(AdapterFedAvg):
    """FedAvg of zero-padded adapters from hospitals training different LoRA ranks.

    The round config carries ``hetlora`` = True and ``hetlora-ranks`` (from
    ``StrategyOptions.hetlora_ranks``); ``client.exchange`` truncates and pads at the hospital.
    """

    needs_only_sum = True

    def _mark(self, config: ConfigRecord) -> None:
        config["hetlora"] = True
        if self.options.hetlora_ranks:
            config["hetlora-ranks"] = [int(r) for r in self.options.hetlora_ranks]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._mark(config)
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Hospitals evaluate the adapter they can run: the global one truncated to their rank.
        self._mark(config)
        return super().configure_evaluate(server_round, arrays, config, grid)
