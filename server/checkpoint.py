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

A server optimiser's state is in the checkpoint too: Flower's FedOpt family (FedAdam, FedYogi,
FedAdagrad) keeps its first and second moments ``m_t`` and ``v_t`` (adapter tensor name ->
array) in memory; they are saved as ``__strategy.m_t/<name>`` and ``__strategy.v_t/<name>``
tensors and put back on the resumed strategy, so a resumed FedAdam run steps exactly as an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.errors import MedfedError

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.safetensors"
_RNG_TORCH = "__rng.torch"
_RNG_NUMPY = "__rng.numpy"
_STRATEGY = "__strategy."
_STRATEGY_STATE = ("m_t", "v_t")
"""Strategy attributes saved: FedOpt's moments (dicts of name -> array, or None)."""


class CheckpointError(MedfedError, RuntimeError):
    """A checkpoint that does not belong to this run or cannot be read."""


@dataclass
class Checkpoint:
    """A completed round, as the coordinator needs it to go on.

    Attributes:
        server_round: the last completed round (1-based).
        arrays: the global adapter after that round, name -> tensor.
        settings_fingerprint: sha256 of the run's settings (see :func:`settings_fingerprint`).
        rows: the run records' rows so far (``RunRecords.rows`` values).
        strategy_state: the strategy's saved state, ``"m_t/<name>"`` -> tensor (empty for
            strategies without one); see :func:`strategy_state`.
    """

    server_round: int
    arrays: dict[str, torch.Tensor]
    settings_fingerprint: str
    rows: list[dict[str, Any]]
    strategy_state: dict[str, torch.Tensor] = field(default_factory=dict)


def _unwrap(strategy: Any) -> Any:
    while isinstance(strategy, RoundOffset):
        strategy = strategy.inner
    return strategy


def strategy_state(strategy: Any) -> dict[str, torch.Tensor]:
    """The strategy's optimiser state as ``"m_t/<name>"``/``"v_t/<name>"`` -> tensor (FedOpt's
    moments; empty for strategies without them or before their first aggregation)."""
    strategy = _unwrap(strategy)
    state = {}
    for attr in _STRATEGY_STATE:
        for name, value in (getattr(strategy, attr, None) or {}).items():
            state[f"{attr}/{name}"] = torch.from_numpy(np.array(value, copy=True))
    return state


def restore_strategy_state(strategy: Any, state: dict[str, torch.Tensor]) -> None:
    """Put :func:`strategy_state`'s output back on ``strategy``.

    Raises:
        CheckpointError: the state has moments the strategy does not keep.
    """
    strategy = _unwrap(strategy)
    values: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in state.items():
        attr, _, name = key.partition("/")
        if attr not in _STRATEGY_STATE or not hasattr(strategy, attr):
            raise CheckpointError(f"the checkpoint holds strategy state '{attr}' that "
                                  f"{type(strategy).__name__} does not keep")
        values.setdefault(attr, {})[name] = tensor.numpy()
    for attr, arrays in values.items():
        setattr(strategy, attr, arrays)


def settings_fingerprint(*settings: Any) -> str:
    """sha256 of the settings' ``repr`` (dataclasses): a checkpoint resumes only its own run."""
    return hashlib.sha256("\n".join(repr(s) for s in settings).encode()).hexdigest()


def save_checkpoint(run_dir: Path, server_round: int, arrays: ArrayRecord, fingerprint: str,
                    rows: Iterable[dict[str, Any]], strategy: Any = None) -> Path:
    """Write the checkpoint after ``server_round`` atomically, with the current RNG states and
    ``strategy``'s optimiser state (see :func:`strategy_state`)."""
    path = Path(run_dir) / CHECKPOINT_FILE
    tensors = {name: t.detach().cpu().contiguous()
               for name, t in arrays.to_torch_state_dict().items()}
    if strategy is not None:
        tensors |= {_STRATEGY + key: t.contiguous()
                    for key, t in strategy_state(strategy).items()}
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
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    except (OSError, SafetensorError) as err:
        # Disk full, quota, I/O error (safetensors reports them as its own error): the
        # previous checkpoint stays whole and in place.
        tmp.unlink(missing_ok=True)
        kept = "the previous checkpoint is intact" if path.exists() else "no earlier checkpoint"
        reason = getattr(err, "strerror", None) or err
        raise CheckpointError(f"{path}: cannot write the checkpoint of round {server_round} "
                              f"({reason}); {kept}. Free space in {path.parent} and start the "
                              f"run again to resume") from err
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
    state = {key[len(_STRATEGY):]: tensors.pop(key) for key in list(tensors)
             if key.startswith(_STRATEGY)}
    return Checkpoint(server_round=int(metadata["server_round"]), arrays=tensors,
                      settings_fingerprint=fingerprint, rows=json.loads(metadata["rows"]),
                      strategy_state=state)


class _SteadyNodeCount:
    """``grid`` whose second ``get_node_ids`` answer repeats the first.

    Flower's strategies count the connected nodes, derive a sample size from the count, then
    wait until that many are connected: a node that leaves between the two calls (a revoked
    hospital) made the wait endless. With the same list twice, the round samples it and its
    message comes back as an error at once; later calls (a real wait for nodes) ask again.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._calls = 0
        self._first: list[int] = []

    def get_node_ids(self) -> list[int]:
        self._calls += 1
        if self._calls == 2:
            return self._first
        ids = list(self._grid.get_node_ids())
        if self._calls == 1:
            self._first = ids
        return ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class RoundOffset(Strategy):
    """``inner`` seen through rounds shifted by ``offset``: round 1 of a resumed ``start`` is
    round ``offset + 1`` for the strategy, the hospitals and the records."""

    def __init__(self, inner: Strategy, offset: int,
                 state: dict[str, torch.Tensor] | None = None) -> None:
        self.inner = inner
        self.offset = offset
        if state:
            restore_strategy_state(inner, state)
        elif offset and getattr(inner, "m_t", None) is None and hasattr(inner, "m_t"):
            logger.warning("resuming %s from a checkpoint without its server optimiser moments: "
                           "they restart from zero at round %d", type(inner).__name__, offset + 1)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round + self.offset, arrays, config,
                                          _SteadyNodeCount(grid))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Replies arrive in whatever order the hospitals finish; floating-point sums depend
        # on the order, so aggregate in node order: a resumed run then ends bit for bit as an
        # uninterrupted one.
        ordered = sorted(replies, key=lambda reply: reply.metadata.src_node_id)
        return self.inner.aggregate_train(server_round + self.offset, ordered)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config,
                                             _SteadyNodeCount(grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)

    def summary(self) -> None:
        self.inner.summary()
