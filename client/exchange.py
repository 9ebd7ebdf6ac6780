"""The adapter a hospital loads and sends back, per the round's ``adapter-exchange`` mode.

See ``models.lora_parts``: ``all`` loads and sends every adapter tensor; ``ffa`` freezes LoRA A
and sends only B and the head; ``fedsa`` keeps the hospital's own B in ``context.state`` between
rounds (it never leaves the hospital) and sends A and the head.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context
from peft import PeftModel

from models.adapters import adapter_state, load_adapter_state
from models.lora_parts import check_exchange, exchanged_keys, freeze_lora_a, kept_keys, select

PERSONAL_STATE_KEY = "fedsa-personal-adapter"
"""Where a FedSA-LoRA hospital keeps its own LoRA B tensors in ``context.state``."""


def exchange_mode(config: ConfigRecord) -> str:
    """The round's adapter-exchange mode (``all`` when the coordinator does not say)."""
    return check_exchange(str(config.get("adapter-exchange", "all")))


def receive_adapter(model: PeftModel, arrays: ArrayRecord, config: ConfigRecord,
                    context: Context) -> None:
    """Load the coordinator's adapter, then (FedSA-LoRA) this hospital's own B over it, and
    freeze LoRA A for FFA-LoRA."""
    mode = exchange_mode(config)
    freeze_lora_a(model, mode == "ffa")
    state = arrays.to_torch_state_dict()
    if mode == "fedsa" and PERSONAL_STATE_KEY in context.state:
        state.update(context.state[PERSONAL_STATE_KEY].to_torch_state_dict())
    load_adapter_state(model, state)


def send_adapter(model: PeftModel, config: ConfigRecord, context: Context) -> ArrayRecord:
    """The tensors to send back after training; FedSA-LoRA's B is stored locally instead."""
    mode = exchange_mode(config)
    state = adapter_state(model)
    kept = kept_keys(list(state), mode)
    if kept:
        context.state[PERSONAL_STATE_KEY] = ArrayRecord(select(state, kept))
    return ArrayRecord(select(state, exchanged_keys(list(state), mode)))
