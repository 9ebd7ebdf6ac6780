"""The coordinator's per-round checkpoint, and resuming a run from it.

After every round's central evaluation the coordinator writes ``RUN_DIR/checkpoint.safetensors``:
the global adapter arrays, and in the safetensors header the round number, a fingerprint of the
run's settings, the run records so far and the RNG states (Python's ``random``, which Flower's
node sampling uses; NumPy's; torch's). The file is written to a temporary name, fsynced and
renamed over the old one, so a crash leaves either the previous or the new checkpoint.

A run started again with the same settings and run directory resumes after the checkpointed
round: Flower's ``Strategy.start`` always counts rounds from 1, so :class:`RoundOffset` shifts
the round numbers the strategy, the hospitals (``server-round`` in the round's config, which
sets their seeds and learning rate) and the records see.

Not in the checkpoint yet: a server optimiser's state (FedAdam/FedYogi moments); resuming those
strategies restarts their moments (logged as a warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.safetensors"
_RNG_TORCH = "__rng.torch"
_RNG_NUMPY = "__rng.numpy"


class CheckpointError(RuntimeError):
    """A checkpoint that does not belong to this run or cannot be read."""


@dataclass
class Checkpoint:
    """A completed round, as the coordinator needs it to go on.

    Attributes:
        server_round: the last completed round (1-based).
        arrays: the global adapter after that round, name -> tensor.
        settings_fingerprint: sha256 of the run's settings (see :func:`settings_fingerprint`).
        rows: the run records' rows so far (``RunRecords.rows`` values).
    """

    server_round: int
    arrays: dict[str, torch.Tensor]
    settings_fingerprint: str
    rows: list[dict[str, Any]]


def settings_fingerprint(*settings: Any) -> str:
    """sha256 of the settings' ``repr`` (dataclasses): a checkpoint resumes only its own run."""
    return hashlib.sha256("\n".join(repr(s) for s in settings).encode()).hexdigest()


def save_checkpoint(run_dir: Path, server_round: int, arrays: ArrayRecord, fingerprint: str,
                    rows: Iterable[dict[str, Any]]) -> Path:
    """Write the checkpoint after ``server_round`` atomically, with the current RNG states."""
    path = Path(run_dir) / CHECKPOINT_FILE
    tensors = {name: t.detach().cpu().contiguous()
               for name, t in arrays.to_torch_state_dict().items()}
    np_state = np.random.get_state()
    tensors[_RNG_TORCH] = torch.get_rng_state()
    tensors[_RNG_NUMPY] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    metadata = {
        "server_round": str(server_round),
        "settings_fingerprint": fingerprint,
        "rows": json.dumps(list(rows), allow_nan=True),
        "rng_python": json.dumps(random.getstate()),
        "rng_numpy": json.dumps([np_state[0], *map(float, np_state[2:])]),
    }
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)
    return path


def load_checkpoint(run_dir: Path, fingerprint: str) -> Checkpoint | None:
    """The run directory's checkpoint with the RNG states restored, or None without one.

    Raises:
        CheckpointError: the checkpoint is of a run with other settings, or unreadable.
    """
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({err}); move it away to "
                              f"start the run afresh") from err
    if metadata.get("settings_fingerprint") != fingerprint:
        raise CheckpointError(f"{path} is of a run with other settings: resume with the same "
                              f"settings, or use another run directory")
    version, state, gauss = json.loads(metadata["rng_python"])
    random.setstate((version, tuple(state), gauss))
    np_name, pos, has_gauss, cached = json.loads(metadata["rng_numpy"])
    np.random.set_state((np_name, tensors.pop(_RNG_NUMPY).numpy().astype(np.uint32),
                         int(pos), int(has_gauss), cached))
    torch.set_rng_state(tensors.pop(_RNG_TORCH))
    return Checkpoint(server_round=int(metadata["server_round"]), arrays=tensors,
                      settings_fingerprint=fingerprint, rows=json.loads(metadata["rows"]))


class RoundOffset(Strategy):
    """``inner`` seen through rounds shifted by ``offset``: round 1 of a resumed ``start`` is
    round ``offset + 1`` for the strategy, the hospitals and the records."""

    def __init__(self, inner: Strategy, offset: int) -> None:
        self.inner = inner
        self.offset = offset
        if hasattr(inner, "m_t"):  # Flower's FedOpt family keeps server moments in memory
            logger.warning("resuming %s: its server optimiser moments are not checkpointed "
                           "and restart from zero at round %d", type(inner).__name__, offset + 1)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)

    def summary(self) -> None:
        self.inner.summary()
