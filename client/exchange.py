"""The adapter a hospital loads and sends back, per the round's ``adapter-exchange`` mode.

See ``models.lora_parts``: ``all`` loads and sends every adapter tensor; ``ffa`` freezes LoRA A
and sends only B and the head; ``fedsa`` keeps the hospital's own B in ``context.state`` between
rounds (it never leaves the hospital) and sends A and the head.

Heterogeneous ranks (``hetlora``): when the round config says ``hetlora`` the hospital
builds its model at its own rank (:func:`hospital_rank`), loads the first ``r`` components of
the global adapter and sends its factors zero-padded back to the global rank, so the coordinator
aggregates same-shaped tensors by a plain weighted sum (secure aggregation still applies).
"""

from __future__ import annotations

from dataclasses import replace

from flwr.app import ArrayRecord, ConfigRecord, Context
from peft import PeftModel

from models.adapters import adapter_state, load_adapter_state
from models.config import ModelConfig
from models.finite import check_finite_tensors
from models.lora_parts import (
    check_exchange,
    exchanged_keys,
    freeze_lora_a,
    kept_keys,
    pad_rank,
    select,
    set_trainable,
    truncate_rank,
)

PERSONAL_STATE_KEY = "fedsa-personal-adapter"
"""Where a FedSA-LoRA hospital keeps its own LoRA B tensors in ``context.state``."""


def exchange_mode(config: ConfigRecord) -> str:
    """The round's adapter-exchange mode (``all`` when the coordinator does not say)."""
    return check_exchange(str(config.get("adapter-exchange", "all")))


HETLORA_KEY = "hetlora"
"""Round-config flag: hospitals train at their own LoRA rank (``hetlora``)."""
RANKS_KEY = "hetlora-ranks"
"""Round-config list of ranks, hospital ``k`` (partition id) taking ``ranks[k % len]``."""
NODE_RANK_KEY = "lora-rank"
"""Node-config key a real hospital sets to its own rank (takes precedence over the list)."""


def hospital_rank(config: ConfigRecord, context: Context) -> int:
    """The LoRA rank this hospital trains in this round (the global ``lora-r`` unless the round
    is ``hetlora``): node config ``lora-rank``, else the round's ``hetlora-ranks`` list by
    partition id, else the global rank. A rank outside 1..global is a ValueError."""
    global_rank = int(config["lora-r"])
    if not config.get(HETLORA_KEY, False):
        return global_rank
    if NODE_RANK_KEY in context.node_config:
        rank, source = int(context.node_config[NODE_RANK_KEY]), f"node config '{NODE_RANK_KEY}'"
    elif ranks := list(config.get(RANKS_KEY, [])):
        hospital = int(context.node_config.get("partition-id", context.node_id))
        rank, source = int(ranks[hospital % len(ranks)]), f"round config '{RANKS_KEY}'"
    else:
        return global_rank
    if not 1 <= rank <= global_rank:
        raise ValueError(f"{source}: LoRA rank {rank} must be between 1 and the global rank "
                         f"{global_rank}")
    return rank


def hospital_model_config(model_config: ModelConfig, config: ConfigRecord,
                          context: Context) -> ModelConfig:
    """The model this hospital builds: the run's, at :func:`hospital_rank`.

    peft scales ``B @ A`` by ``lora_alpha / r``; a rank-``r`` hospital uses
    ``alpha * r / r_global`` so its scale equals the global adapter's and truncating or
    zero-padding the factors leaves ``scale * B @ A`` unchanged.
    """
    rank = hospital_rank(config, context)
    if rank == model_config.lora_r:
        return model_config
    alpha = model_config.lora_alpha * rank / model_config.lora_r
    return replace(model_config, lora_r=rank,
                   lora_alpha=int(alpha) if float(alpha).is_integer() else alpha)


def receive_adapter(model: PeftModel, arrays: ArrayRecord, config: ConfigRecord,
                    context: Context) -> None:
    """Load the coordinator's adapter, then (FedSA-LoRA) this hospital's own B over it; freeze
    what the round's ``trainable`` leaves out, and LoRA A for FFA-LoRA."""
    mode = exchange_mode(config)
    set_trainable(model, str(config.get("trainable", "all")))
    if mode == "ffa":
        freeze_lora_a(model, True)
    state = arrays.to_torch_state_dict()
    # Finite or refused, before anything uses it: a NaN in a tensor training leaves alone
    # would otherwise make the update's norm NaN and switch clipping off.
    check_finite_tensors(state, "the coordinator's adapter")
    if mode == "fedsa" and PERSONAL_STATE_KEY in context.state:
        state.update(context.state[PERSONAL_STATE_KEY].to_torch_state_dict())
    rank = hospital_rank(config, context)
    if rank != int(config["lora-r"]):
        state = truncate_rank(state, rank)
    load_adapter_state(model, state)
    # The model as it will train and evaluate (a tensor the coordinator did not send keeps
    # the cached model's value, which must be finite too).
    check_finite_tensors(adapter_state(model), "the adapter this round starts from")


def send_adapter(model: PeftModel, config: ConfigRecord, context: Context) -> ArrayRecord:
    """The tensors to send back after training; FedSA-LoRA's B is stored locally instead; a
    lower-rank (``hetlora``) hospital's factors are zero-padded to the global rank."""
    mode = exchange_mode(config)
    state = adapter_state(model)
    check_finite_tensors(state, "the update")  # never released otherwise
    if config.get(HETLORA_KEY, False):
        state = pad_rank(state, int(config["lora-r"]))
    kept = kept_keys(list(state), mode)
    if kept:
        context.state[PERSONAL_STATE_KEY] = ArrayRecord(select(state, kept))
    return ArrayRecord(select(state, exchanged_keys(list(state), mode)))
