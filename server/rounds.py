"""The coordinator's round loop: initial adapter, strategy, central evaluation, records."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from peft import PeftModel

from models.adapters import adapter_state, load_adapter_file, load_adapter_state, save_adapter
from models.config import ModelConfig, TrainConfig, to_config_record
from models.data import ImageSet
from models.lora import build_lora_model
from privacy.config import DPConfig
from server.checkpoint import (
    CHECKPOINT_FILE,
    RoundOffset,
    load_checkpoint,
    save_checkpoint,
    settings_fingerprint,
)
from server.config import FederationConfig
from server.evaluation import central_evaluator
from server.records import RunRecords
from server.secure_aggregation import secure_grid
from strategies import Reply, build_strategy
from strategies.adapter import TooFewUpdates

logger = logging.getLogger(__name__)

RoundCallback = Callable[[int, dict[str, float]], None]
"""Called after each round's central evaluation with ``(round, test metrics)``."""
ReplyCallback = Callable[[Reply], None]
"""Called with each hospital's reply (or failure) as it is recorded."""


class FederationError(RuntimeError):
    """A run that did not complete the rounds it was asked for."""


@dataclass
class FederationOutcome:
    """What the round loop produced.

    Attributes:
        model: the LoRA model holding the final global adapter.
        wall_time_s: seconds from the first round's start to the last evaluation.
    """

    model: PeftModel
    wall_time_s: float


def initial_model(model_config: ModelConfig, seed: int, adapter: str = "",
                  adapter_sha256: str = "") -> PeftModel:
    """The run's starting point: pretrained backbone, seeded LoRA factors and head, or the
    saved ``adapter`` (checked against ``adapter_sha256`` when given) in their place."""
    torch.manual_seed(seed)
    model = build_lora_model(model_config, verify=True)
    if adapter:
        load_adapter_file(model, Path(adapter), adapter_sha256)
        logger.info("starting from the adapter in %s", adapter)
    return model


def run_federation(
    grid: Grid,
    federation: FederationConfig,
    model_config: ModelConfig,
    train_config: TrainConfig,
    test_set: ImageSet,
    records: RunRecords,
    on_round: RoundCallback | None = None,
    on_reply: ReplyCallback | None = None,
    dp: DPConfig | None = None,
) -> FederationOutcome:
    """Run ``federation.rounds`` rounds and write metrics and the final adapter to ``records``.

    ``dp`` travels in each round's config; with client-level DP the strategy averages
    updates uniformly (hospitals send ``update-weight`` = 1), as its sensitivity bound needs.

    Raises:
        FederationError: a round ended with fewer than ``federation.min_hospitals`` valid updates.
    """
    if dp is not None:
        dp = replace(dp, dp_run_rounds=dp.dp_run_rounds or federation.rounds)
    model = initial_model(model_config, train_config.seed, federation.initial_adapter,
                          federation.initial_adapter_sha256)
    strategy = build_strategy(
        federation.strategy,
        fraction_train=federation.fraction_train,
        fraction_evaluate=federation.fraction_evaluate,
        min_train_nodes=federation.min_hospitals,
        min_evaluate_nodes=min(federation.min_hospitals, 1) if federation.fraction_evaluate else 0,
        min_available_nodes=federation.min_hospitals,
        observer=lambda reply: _observe(reply, records, on_reply),
        train_weighted_by_key="update-weight" if dp is not None and dp.update_dp else None,
        options=federation.options,  # the strategies' settings
    )
    if federation.secure_aggregation.enabled:
        # Training rounds then run SecAgg+: the strategy only ever receives the sum.
        grid = secure_grid(grid, federation.secure_aggregation, strategy, dp)
    evaluator = central_evaluator(model, test_set)
    # A checkpoint after every round; a run dir holding one (a crashed run with the same
    # settings) resumes after its round, with its arrays, RNG states and records.
    fingerprint = settings_fingerprint(federation, model_config, train_config, dp)
    resumed = load_checkpoint(records.run_dir, fingerprint)
    done = resumed.server_round if resumed is not None else 0
    initial_arrays = ArrayRecord(adapter_state(model))
    if resumed is not None:
        initial_arrays = ArrayRecord({k: resumed.arrays[k] for k in initial_arrays})
        records.rows.update({(r["round"], r["hospital"]): r for r in resumed.rows})
        logger.info("resuming %s after round %d of %d", records.run_dir, done, federation.rounds)
        # Flower counts from 1: shift to done + 1; FedOpt's moments come back.
        strategy = RoundOffset(strategy, done, resumed.strategy_state)

    def evaluate_fn(server_round: int, arrays: ArrayRecord):
        server_round += done
        if resumed is not None and server_round == done:
            return None  # evaluated and recorded before the crash
        metrics = evaluator(server_round, arrays)
        records.add_test(server_round, dict(metrics))
        logger.debug("round %d: test %s", server_round, dict(metrics))
        if server_round > 0:
            save_checkpoint(records.run_dir, server_round, arrays, fingerprint,
                            records.rows.values(), strategy)
        if on_round is not None:
            on_round(server_round, dict(metrics))
        return metrics

    wire_config = to_config_record(model_config, train_config, *([dp] if dp else []))
    evaluate_config = to_config_record(model_config, train_config)
    # Declared in every message so that a hospital's run policy can refuse too small
    # aggregates and tasks it has not agreed to.
    for config in (wire_config, evaluate_config):
        config["min-hospitals"] = federation.min_hospitals
        config["task"] = federation.task
    # Names the run across restarts: a hospital reports "this run's" epsilon from its ledger.
    wire_config["run-key"] = hashlib.sha256(
        f"{records.run_dir.resolve()}\n{fingerprint}".encode()).hexdigest()[:32]
    start = time.monotonic()
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=initial_arrays,
            num_rounds=federation.rounds - done,
            timeout=federation.round_timeout_s,
            train_config=wire_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )
    except TooFewUpdates as err:  # end at the round that failed, saying why
        records.write_metrics()
        raise FederationError(f"{err}. See {records.run_dir / 'metrics.csv'}") from err
    wall_time = time.monotonic() - start
    records.write_metrics()
    _check_rounds(records, federation)
    load_adapter_state(model, result.arrays.to_torch_state_dict())
    save_adapter(model, records.run_dir / "adapter")
    # A finished run starts afresh when run again (the checkpoint is for crashes).
    (records.run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    return FederationOutcome(model=model, wall_time_s=wall_time)


def _observe(reply: Reply, records: RunRecords, on_reply: ReplyCallback | None) -> None:
    records.add_reply(reply)
    if on_reply is not None:
        on_reply(reply)


def _check_rounds(records: RunRecords, federation: FederationConfig) -> None:
    """Flower ends a run normally even when hospitals failed: check each round's updates."""
    for server_round in range(1, federation.rounds + 1):
        good = [r for r in records.train_rows()
                if r["round"] == server_round and "train_loss" in r and not r.get("error")]
        if len(good) < federation.min_hospitals:
            errors = [f"hospital {r['hospital']}: {r['error']}" for r in records.train_rows()
                      if r["round"] == server_round and r.get("error")]
            raise FederationError(
                f"round {server_round} got {len(good)} valid updates, needs "
                f"{federation.min_hospitals}; {'; '.join(errors) or 'no hospital answered'}. "
                f"See {records.run_dir / 'metrics.csv'}"
            )
