"""Activations of a network's frozen prefix, kept in memory by input digest.

When LoRA adapts only a network's later blocks, everything before the first adapted block is a
fixed function of the input: the same image gives the same activations in every epoch and round.
Computing them once per image and training from the stored activations computes the same function
(not an approximation) as long as the prefix runs in inference mode: BatchNorm on its running
statistics and no stochastic depth, which is how medfed runs every frozen layer.

A cache may also keep each activation on disk (one ``.npy`` file per input and split, written
atomically), so that processes and later runs reuse it: what a 3D encoder's prefix costs makes
that worth it. Activations are derived from patient inputs; the folder must be storage that may
hold them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


def is_fixed(module: torch.nn.Module) -> bool:
    """Whether ``module`` may sit in a cached prefix: it trains no tensor and holds no adapter
    tensor. A LoRA layer that does not train in a round still changes with the round's global
    adapter, which the cache key (input digest and split) does not hold."""
    return not any(p.requires_grad or "lora_" in name for name, p in module.named_parameters())


def input_digest(example: torch.Tensor) -> bytes:
    """Key of one input (an image or a volume, without the batch axis): SHA-256 of its dtype,
    shape and bytes."""
    digest = hashlib.sha256(f"{example.dtype}:{tuple(example.shape)}:".encode())
    digest.update(example.detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()


class PrefixCache:
    """Prefix activations by ``(split, input digest)``, least recently used dropped first.

    Args:
        max_bytes: most bytes of activations kept in memory; 0 keeps nothing there.
        folder: where activations are also kept on disk (None: memory only).
        scope: names what the activations were computed by (base weights, input convention);
            with the split and the torch version it picks a subfolder of ``folder``, so a
            different network or preprocessing never reads another's files.
    """

    def __init__(self, max_bytes: int, folder: Path | None = None, scope: str = "") -> None:
        if folder is not None and not scope:
            raise ValueError("a prefix cache on disk needs a scope (what computed it)")
        self.max_bytes = max_bytes
        self.folder = folder
        self.scope = scope
        self._entries: OrderedDict[tuple[int, bytes], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def activations(self, inputs: torch.Tensor, split: int,
                    compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The prefix activations of a batch, computing only those not stored.

        Args:
            inputs: ``(B, ...)`` inputs of the network.
            split: which prefix (e.g. the number of frozen blocks); part of the key.
            compute: ``(b, ...)`` inputs -> ``(b, ...)`` prefix activations; called under
                ``torch.no_grad`` on the inputs not stored yet.

        Returns:
            ``(B, ...)`` activations in the order of ``inputs`` (not requiring grad).
        """
        keys = [(split, input_digest(example)) for example in inputs]
        batch: dict[tuple[int, bytes], torch.Tensor] = {}
        for key in keys:
            stored = self._entries.get(key)
            if stored is None:
                stored = self._load(key)
            if stored is not None:
                batch[key] = stored
        missing = [i for i, key in enumerate(keys) if key not in batch]
        if missing:
            with torch.no_grad():
                # CPU convolutions round a batch of one differently from larger batches (where
                # an example's result does not depend on its batch): compute a lone input as a
                # pair so that what is stored never depends on which batch computed it.
                fresh = compute(inputs[missing * 2])[:1] if len(missing) == 1 else compute(
                    inputs[missing])
            for i, activation in zip(missing, fresh, strict=True):
                batch[keys[i]] = activation.clone()  # a view would pin the whole batch
                self._store(keys[i], batch[keys[i]])
                self._save(keys[i], batch[keys[i]])
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        for key in keys:
            if key in self._entries:
                self._entries.move_to_end(key)
        return torch.stack([batch[key] for key in keys])

    def clear(self) -> None:
        """Forget every activation held in memory (files on disk stay)."""
        self._entries.clear()
        self._bytes = 0

    def _store(self, key: tuple[int, bytes], activation: torch.Tensor) -> None:
        size = activation.numel() * activation.element_size()
        if size > self.max_bytes:
            return
        if key not in self._entries:
            self._bytes += size
        self._entries[key] = activation
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def path(self, key: tuple[int, bytes]) -> Path | None:
        """The file of one ``(split, digest)`` key on disk (None without a folder)."""
        if self.folder is None:
            return None
        subfolder = hashlib.sha256(
            f"{self.scope}:split={key[0]}:{torch.__version__}".encode()).hexdigest()[:24]
        return self.folder / subfolder / f"{key[1].hex()}.npy"

    def _load(self, key: tuple[int, bytes]) -> torch.Tensor | None:
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            activation = torch.from_numpy(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as err:  # a torn or foreign file: compute it again
            logger.warning("prefix cache file %s unreadable (%s); computing it again", path, err)
            return None
        self._store(key, activation)
        return activation

    def _save(self, key: tuple[int, bytes], activation: torch.Tensor) -> None:
        path = self.path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.part.npy")
        np.save(partial, activation.numpy(), allow_pickle=False)
        partial.replace(path)  # atomic: readers see a whole file or none
