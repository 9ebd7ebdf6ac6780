"""LoRA-aware rules: which factor is averaged, which is frozen or kept (``models.lora_parts``).

- ``ffa-lora`` (Sun et al., ICLR 2024): A frozen at the shared seeded initialisation the
  coordinator sends in round 1, only B and the head are trained and sent; the average of the B's
  is then exactly the average of the updates ``B @ A``, at about half the LoRA upload.
- ``fedsa-lora`` (Guo et al., ICLR 2025): A and the head are shared and averaged, B stays at
  each hospital between rounds (personalisation); the hospitals' validation metrics are those of
  their personalised adapters, the coordinator's test metrics those of the shared part (B at its
  initial value).
"""

from __future__ import annotations

from strategies.fedavg import AdapterFedAvg


class FFALoRA(AdapterFedAvg):
    """FedAvg of B and the head, with A frozen everywhere."""

    needs_only_sum = True
    exchange = "ffa"


class FedSALoRA(AdapterFedAvg):
    """FedAvg of A and the head; each hospital keeps its own B."""

    needs_only_sum = True
    exchange = "fedsa"
