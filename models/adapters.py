"""Adapter tensors in and out: what crosses the wire, in peft's own naming and format."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict


def adapter_state(model: PeftModel) -> OrderedDict[str, torch.Tensor]:
    """LoRA factors and head tensors of the model (peft names), detached copies on CPU."""
    state = get_peft_model_state_dict(model)
    return OrderedDict((k, v.detach().cpu().clone().contiguous()) for k, v in state.items())


class AdapterMismatchError(ValueError):
    """Adapter tensors that do not fit the model they are loaded into."""


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Put adapter tensors into the model; every expected tensor must be given, with its shape."""
    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterMismatchError(
            f"adapter does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise AdapterMismatchError(
                f"adapter tensor '{key}' has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
    set_peft_model_state_dict(model, state)


def adapter_nbytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors' data (what an update costs on the wire, before framing)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def save_adapter(model: PeftModel, directory: Path) -> Path:
    """Write the adapter in peft's format, loadable with ``PeftModel.from_pretrained``."""
    model.save_pretrained(str(directory))
    return directory
