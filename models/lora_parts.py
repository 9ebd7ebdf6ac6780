"""Which LoRA factors a hospital trains, sends and keeps, per adapter-exchange mode.

LoRA adapts a layer by ``W + B @ A``. Averaging A and B separately is not the average of the
products ``B @ A``; two rules avoid that by never averaging one of the factors:

- ``ffa`` (FFA-LoRA, Sun et al., ICLR 2024): A stays frozen at the shared seeded initialisation;
  hospitals train and send only B (and the head), so averaging B averages ``B @ A`` exactly.
- ``fedsa`` (FedSA-LoRA, Guo et al., ICLR 2025): A (general knowledge) is shared and averaged;
  B (site-specific) stays at each hospital, which keeps a personalised adapter.

``all`` exchanges every adapter tensor (FedAvg and the rules built on it).

Heterogeneous ranks (``hetlora``, Cho et al. 2024): a hospital of rank ``r`` keeps the first
``r`` rank components of the global adapter (:func:`truncate_rank`) and pads its trained factors
with zeros back to the global rank (:func:`pad_rank`). peft stores A as ``[r, in, ...]`` and B
as ``[out, r, ...]`` (Linear and Conv alike), so the rank is dim 0 of A and dim 1 of B.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from models.config import TRAINABLE

EXCHANGES = ("all", "ffa", "fedsa")
"""Adapter-exchange modes, as sent in the round config under ``adapter-exchange``."""

_NOT_SENT = {"all": None, "ffa": "lora_A", "fedsa": "lora_B"}


def _factor(key: str) -> str | None:
    for factor in ("lora_A", "lora_B"):
        if f".{factor}." in key or key.endswith(f".{factor}"):
            return factor
    return None


def check_exchange(mode: str) -> str:
    """``mode`` if it is one of :data:`EXCHANGES`, else a ValueError naming the choices."""
    if mode not in EXCHANGES:
        raise ValueError(f"unknown adapter-exchange '{mode}': choose one of {list(EXCHANGES)}")
    return mode


def exchanged_keys(keys, mode: str) -> list[str]:
    """The adapter tensor names (peft names) that cross the wire under ``mode``, in order."""
    skipped = _NOT_SENT[check_exchange(mode)]
    return [k for k in keys if skipped is None or _factor(k) != skipped]


def kept_keys(keys, mode: str) -> list[str]:
    """The names a hospital keeps to itself under ``mode`` (FedSA-LoRA's B; else none)."""
    sent = set(exchanged_keys(keys, mode))
    return [k for k in keys if k not in sent] if mode == "fedsa" else []


def select(state: dict[str, torch.Tensor], keys) -> OrderedDict[str, torch.Tensor]:
    """The tensors of ``state`` named in ``keys``, in ``state``'s order."""
    wanted = set(keys)
    return OrderedDict((k, v) for k, v in state.items() if k in wanted)


def _rank_dim(key: str) -> int | None:
    """The rank dimension of an adapter tensor (0 for A, 1 for B), None for the head."""
    return {"lora_A": 0, "lora_B": 1}.get(_factor(key) or "")


def truncate_rank(state: dict[str, torch.Tensor], rank: int) -> OrderedDict[str, torch.Tensor]:
    """The first ``rank`` components of every LoRA factor (A's rows, B's columns); the head is
    unchanged. ``rank`` larger than a factor's rank is a ValueError."""
    out = OrderedDict()
    for key, tensor in state.items():
        dim = _rank_dim(key)
        if dim is not None:
            if rank > tensor.shape[dim]:
                raise ValueError(f"cannot truncate '{key}' of rank {tensor.shape[dim]} to "
                                 f"rank {rank}")
            tensor = tensor.narrow(dim, 0, rank).clone()
        out[key] = tensor
    return out


def pad_rank(state: dict[str, torch.Tensor], rank: int) -> OrderedDict[str, torch.Tensor]:
    """Every LoRA factor zero-padded to ``rank`` components (the inverse of
    :func:`truncate_rank` on the kept part); the head is unchanged."""
    out = OrderedDict()
    for key, tensor in state.items():
        dim = _rank_dim(key)
        if dim is not None and tensor.shape[dim] != rank:
            if tensor.shape[dim] > rank:
                raise ValueError(f"cannot pad '{key}' of rank {tensor.shape[dim]} to rank {rank}")
            shape = list(tensor.shape)
            shape[dim] = rank
            padded = torch.zeros(shape, dtype=tensor.dtype)
            padded.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
            tensor = padded
        out[key] = tensor
    return out


def freeze_lora_a(model: nn.Module, frozen: bool) -> None:
    """Freeze (or unfreeze) every LoRA A factor of ``model`` (FFA-LoRA trains only B and the
    head). Cached models are reused across rounds and runs, so this is set on every message."""
    for name, param in model.named_parameters():
        if _factor(name) == "lora_A":
            param.requires_grad_(not frozen)


def set_trainable(model: nn.Module, trainable: str) -> None:
    """Let local training move ``trainable`` (``models.config.TRAINABLE``): every adapter
    tensor, the LoRA factors only, or the head only (peft's ``modules_to_save`` copy). Call
    before :func:`freeze_lora_a`, which may freeze A on top. Set on every message, as cached
    models are reused across rounds and runs (this resets what an earlier message froze)."""
    if trainable not in TRAINABLE:
        raise ValueError(f"unknown trainable '{trainable}': choose one of {list(TRAINABLE)}")
    for name, param in model.named_parameters():
        if ".modules_to_save." in name:
            param.requires_grad_(trainable in ("all", "head"))
        elif _factor(name) is not None:
            param.requires_grad_(trainable in ("all", "adapter"))
