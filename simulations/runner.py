"""One simulation study: federated rounds on Flower's simulation engine, then the baselines.

Writes the run directory (see ``server.records``) and returns the summary it wrote.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid
from rich.console import Console

from client.app import build_client_app
from models.adapters import adapter_nbytes
from models.data import ImageSet
from models.metrics import decision_summary, predict
from models.registry import build_base_model
from privacy.secagg.local_consortium import local_consortium
from server.records import RunRecords
from server.rounds import FederationError, run_summary
from server.simulation_app import ServerRun, build_server_app
from server.study import resolve_study
from simulations.baseline_pool import run_baselines
from simulations.baselines import local_baseline, pooled_baseline
from simulations.config import ConfigError, SimulationConfig, config_dict
from simulations.datasets import class_names
from simulations.progress import RoundProgress
from simulations.segmentation_study import (
    is_segmentation,
    resolve_segmentation,
    run_segmentation_study,
)
from simulations.site_privacy import simulated_site_privacy
from simulations.sites import (
    cached_dataset,
    held_out_test_set,
    hospital_sites,
    simulated_site_loader,
)

logger = logging.getLogger(__name__)

BASELINES = {"pooled": pooled_baseline, "local": local_baseline}


def resolve(config: SimulationConfig) -> SimulationConfig:
    """Fill in what defaults leave open: the classes from the data (names where the dataset has
    them), the weights and initial-adapter pins, the run dir, the DP calibration. A
    segmentation backbone's simulation: ``simulations.segmentation_study``."""
    if is_segmentation(config):
        return resolve_segmentation(config)
    dataset = cached_dataset(config.data.dataset, config.model.image_size)
    if config.classes and len(config.classes) != dataset.num_classes:
        raise ConfigError(f"classes = {config.classes} but {config.data.dataset} has "
                         f"{dataset.num_classes} classes")
    classes = config.classes or class_names(config.data.dataset, dataset.num_classes)
    study = resolve_study(replace(config.study(), classes=classes))
    run_dir = config.run_dir or str(
        Path("runs") / f"{config.data.dataset}-{datetime.now():%Y%m%d-%H%M%S}"
    )
    if config.federation.min_hospitals > config.data.num_hospitals:
        raise ConfigError(
            f"federation.min_hospitals={config.federation.min_hospitals} exceeds "
            f"data.num_hospitals={config.data.num_hospitals}"
        )
    # The run's length and the hospitals sampled per round (Flower's sampling rule)
    # calibrate DP at the hospitals; a deployed coordinator uses min_hospitals instead.
    sampled = max(int(config.data.num_hospitals * config.federation.fraction_train),
                  config.federation.min_hospitals)
    privacy = replace(
        config.privacy,
        dp_run_rounds=config.privacy.dp_run_rounds or config.federation.rounds,
        update_hospitals=config.privacy.update_hospitals or sampled,
    )
    return replace(config, classes=study.classes, model=study.model, run_dir=run_dir,
                   privacy=privacy, federation=study.federation)


def backend_config(config: SimulationConfig) -> dict[str, Any]:
    """Flower's Ray backend: one actor per ``cpus_per_hospital`` cores, quiet, no dashboard;
    with ``ray_address`` Flower attaches to that running Ray cluster instead of
    starting one, and the hospitals' actors spread over its nodes."""
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR",
                                 "log_to_driver": False}
    if config.ray_address:
        init_args["address"] = config.ray_address
    return {
        "client_resources": {"num_cpus": config.cpus_per_hospital, "num_gpus": 0.0},
        "init_args": init_args,
    }


def _straggler_grid(config: SimulationConfig) -> Callable[[Grid], Grid] | None:
    """Hospitals whose replies come late (seeded), held back at the coordinator's end
    of the wire (``simulations.stragglers``); None without stragglers."""
    failures = config.failures
    if failures.straggler_probability == 0 or failures.straggler_delay_s == 0:
        return None
    from simulations.stragglers import StragglerGrid

    def wrap(grid: Grid) -> Grid:
        return StragglerGrid(grid, failures.straggler_probability, failures.straggler_delay_s,
                             config.seed)

    return wrap


def _hide_run_simulation_notice(record: logging.LogRecord) -> bool:
    """Flower 1.42 warns that ``run_simulation`` is deprecated in favour of ``flwr run``; medfed
    calls it on purpose (one process, no SuperLink), so the notice would only alarm users."""
    message = record.getMessage()
    return not ("DEPRECATED FEATURE" in message and "run_simulation" in message)


def _run_flower(config: SimulationConfig, run: ServerRun) -> None:
    from flwr.simulation import run_simulation

    loader = simulated_site_loader(config.data, config.model.image_size, config.seed,
                                   config.run_dir)
    failures = config.failures
    if failures.dropout_probability > 0:
        # Hospitals that fail rounds (seeded), recorded as such.
        from simulations.dropouts import build_dropout_client_app

        client_app = build_dropout_client_app(
            loader, failures.dropout_probability, config.seed, simulated_site_privacy(config))
    elif config.federation.secure_aggregation.enabled:
        # Secure aggregation checks every peer against an enrolled key: the simulated
        # hospitals get a throwaway consortium (fresh CA, keys and signed roster).
        client_app = build_client_app(loader, simulated_site_privacy(config),
                                      local_consortium(list(range(config.data.num_hospitals))))
    else:
        client_app = build_client_app(loader, simulated_site_privacy(config))
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addFilter(_hide_run_simulation_notice)
    try:
        run_simulation(
            server_app=build_server_app(run),
            client_app=client_app,
            num_supernodes=config.data.num_hospitals,
            backend_config=backend_config(config),
        )
    finally:
        flwr_logger.removeFilter(_hide_run_simulation_notice)
        import ray

        if ray.is_initialized():
            ray.shutdown()


def _both(first: Callable[[int, dict[str, float]], None],
          second: Callable[[int, dict[str, float]], None] | None):
    if second is None:
        return first

    def call(server_round: int, metrics: dict[str, float]) -> None:
        first(server_round, metrics)
        second(server_round, metrics)

    return call


def published_decision(model, test: ImageSet, num_classes: int) -> dict[str, Any]:
    """The published adapter's decision rule on the test set, beside always answering the
    commonest class (:func:`models.metrics.decision_summary`); empty without a test set."""
    if not len(test):
        return {}
    predicted = predict(model, test.images).argmax(dim=1).numpy()
    return decision_summary(test.labels.numpy(), predicted, num_classes)


def run_study(config: SimulationConfig, console: Console | None = None,
              on_round: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Run the federated simulation and the baselines; write and return ``summary.json``'s data.

    ``on_round(round, metrics)`` is called after each round's evaluation with the test metrics
    (``test-auc``...) and the hospitals' combined validation metrics (``val-auc``...), as the
    progress display is; benchmarks time rounds with it.

    Raises:
        FederationError: the federated run did not complete every round with enough hospitals.
    """
    if is_segmentation(config):  # hippocampus MRI through the ClientApp, in process
        return run_segmentation_study(config)
    console = console or Console()
    config = resolve(config)
    records = RunRecords(Path(config.run_dir))
    records.write_config(config_dict(config))
    test = held_out_test_set(config.data, config.model.image_size, config.seed)
    progress = RoundProgress(config.federation.rounds, config.data.num_hospitals, console)
    run = ServerRun(
        study=config.study(), records=records, test_set=test,
        on_round=_both(progress.on_round, on_round), on_reply=progress.on_reply,
        wrap_grid=_straggler_grid(config),
    )
    started = time.monotonic()
    with progress:
        _run_flower(config, run)
    if run.error is not None:
        raise FederationError(f"the coordinator failed: {run.error}") from run.error
    if run.outcome is None:
        raise FederationError("the coordinator did not finish; see the log above")
    federated_time = time.monotonic() - started
    summary: dict[str, Any] = {"dataset": config.data.dataset} | run_summary(
        records, config.study(), run.outcome)
    summary["hospitals"] = config.data.num_hospitals
    summary["decision"] = published_decision(run.outcome.model, test,
                                             config.model.num_classes)
    sites = hospital_sites(config.data, config.model.image_size, config.seed)
    summary["examples_per_hospital"] = [len(s.train) for s in sites]
    names = [n for n in ("pooled", "local") if n in config.baselines]
    jobs = {name: partial(BASELINES[name], sites, test, config.model, config.train,
                          config.federation.rounds, dp=config.privacy,
                          adapter=config.federation.initial_adapter,
                          adapter_sha256=config.federation.initial_adapter_sha256,
                          evaluation=config.evaluation)
            for name in names}
    results, baseline_time = run_baselines(
        jobs, waiting=lambda: console.status(f"baselines: {', '.join(names)}"))
    summary.update(results)

    summary["bytes"]["full_model"] = adapter_nbytes(build_base_model(config.model).state_dict())
    summary["wall_time_s"] = {"federated": federated_time} | baseline_time
    records.write_summary(summary)
    if config.tracking.mlflow:  # optional MLflow tracking, off by default
        from simulations.tracking import track_run

        track_run(Path(config.run_dir), True, config.tracking.mlflow_experiment)
    return summary
