"""Activations of a network's frozen prefix, kept in memory by input digest.

When LoRA adapts only a network's later blocks, everything before the first adapted block is a
fixed function of the input: the same image gives the same activations in every epoch and round.
Computing them once per image and training from the stored activations computes the same function
(not an approximation) as long as the prefix runs in inference mode: BatchNorm on its running
statistics and no stochastic depth, which is how medfed runs every frozen layer.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch


def input_digest(example: torch.Tensor) -> bytes:
    """Key of one input (an image or a volume, without the batch axis): SHA-256 of its dtype,
    shape and bytes."""
    digest = hashlib.sha256(f"{example.dtype}:{tuple(example.shape)}:".encode())
    digest.update(example.detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()


class PrefixCache:
    """Prefix activations by ``(split, input digest)``, least recently used dropped first.

    Args:
        max_bytes: most bytes of activations kept; 0 keeps nothing (every call computes).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
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
        batch: dict[tuple[int, bytes], torch.Tensor] = {
            key: self._entries[key] for key in keys if key in self._entries}
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
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        for key in keys:
            if key in self._entries:
                self._entries.move_to_end(key)
        return torch.stack([batch[key] for key in keys])

    def clear(self) -> None:
        """Forget every stored activation."""
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
