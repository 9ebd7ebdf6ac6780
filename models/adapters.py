"""Adapter tensors in and out: what crosses the wire, in peft's own naming and format."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load

from core.errors import MedfedError

ADAPTER_FILE = "adapter_model.safetensors"
"""The tensors' file in a peft adapter directory (``save_adapter``)."""


def adapter_state(model: PeftModel) -> OrderedDict[str, torch.Tensor]:
    """LoRA factors and head tensors of the model (peft names), detached copies on CPU."""
    state = get_peft_model_state_dict(model)
    return OrderedDict((k, v.detach().cpu().clone().contiguous()) for k, v in state.items())


class AdapterMismatchError(MedfedError, ValueError):
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


def adapter_file(path: Path) -> Path:
    """The safetensors file of a saved adapter: ``path`` itself, or ``path/ADAPTER_FILE``."""
    path = Path(path)
    return path / ADAPTER_FILE if path.is_dir() else path


def load_adapter_file(model: PeftModel, path: Path, sha256: str = "") -> str:
    """Load a saved adapter (a ``save_adapter`` directory or its safetensors file) into ``model``.

    Args:
        model: the LoRA model; the file must hold exactly its adapter tensors, with their shapes.
        path: the adapter directory or file.
        sha256: the file's pinned hash; empty: not checked.

    Returns:
        The file's SHA-256, for the run's records.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the hash differs from the pin, or the file is not a readable safetensors file.
        AdapterMismatchError: its tensors do not fit the model (another backbone, rank or targets).
    """
    file = adapter_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no adapter file here; give a directory written by "
                                f"save_adapter or its {ADAPTER_FILE}")
    data = file.read_bytes()  # hashed and loaded from the same bytes: no swap in between
    digest = hashlib.sha256(data).hexdigest()
    if sha256 and digest != sha256:
        raise ValueError(f"{file}: SHA-256 {digest} is not the pinned {sha256}; use the adapter "
                         "the run pinned or update the pin")
    try:
        state = load(data)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file}: not a readable safetensors adapter ({err})") from err
    try:
        load_adapter_state(model, state)
    except AdapterMismatchError as err:
        raise AdapterMismatchError(f"{file}: {err}; was it trained with this run's backbone, "
                                   "LoRA rank and targets?") from err
    return digest
