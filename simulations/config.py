"""A simulation study's settings: one typed config, read from TOML, resolved once.

TOML sections mirror the dataclasses: ``[data]``, ``[model]``, ``[train]``, ``[federation]``
and top-level ``seed``, ``run_dir``, ``baselines``, ``cpus_per_hospital``.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from models.config import ModelConfig, TrainConfig
from privacy.config import DPConfig
from server.config import FederationConfig


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, and how its training split is spread over hospitals.

    Attributes:
        dataset: MedMNIST-format file stem, e.g. ``pneumoniamnist``.
        num_hospitals: simulated hospitals.
        partition: ``iid``, ``dirichlet`` (label skew) or ``quantity`` (hospitals of different
            sizes, labels as drawn).
        alpha: Dirichlet concentration; smaller is more skewed.
        size_distribution: quantity skew's hospital sizes: ``lognormal`` or ``powerlaw``.
        size_skew: lognormal sigma, or power-law exponent (0: equal sizes).
        shift: acquisition shift: ``none`` or ``scanners`` (each hospital's train/validation
            images through its own seeded contrast/intensity/blur/noise profile, MONAI
            transforms; the test set stays as acquired).
        shift_strength: scales the scanner differences (0: none, 1: typical, 2: severe).
        val_fraction: share of each hospital's data kept for its own validation.
        max_train_examples: use only this many training examples (0: all), for quick checks.
        max_test_examples: evaluate on only this many test examples (0: all).
        as_dicom: write each hospital's partition as DICOM files plus a manifest under
            ``<run_dir>/dicom`` and have the hospitals read them through ``client.data``, as a
            real site reads its PACS export (the baselines keep the in-memory arrays).
    """

    dataset: str = "pneumoniamnist"
    num_hospitals: int = 5
    partition: str = "dirichlet"
    alpha: float = 0.5
    size_distribution: str = "lognormal"
    size_skew: float = 1.0
    shift: str = "none"
    shift_strength: float = 1.0
    val_fraction: float = 0.1
    max_train_examples: int = 0
    max_test_examples: int = 0
    as_dicom: bool = False


@dataclass(frozen=True)
class FailureConfig:
    """Simulated hospital failures (``[failures]``).

    Attributes:
        dropout_probability: chance that a sampled hospital fails in a round (its reply is an
            error the coordinator records; the round goes on when ``min_hospitals`` remain).
            Drawn from (seed, round, hospital): the same hospitals fail on a rerun.
        straggler_probability: chance that a sampled hospital is slow in a round's training:
            its reply reaches the coordinator ``straggler_delay_s`` seconds after the round's
            messages went out (drawn like dropouts; ``simulations.stragglers``). With
            ``federation.round_timeout_s`` below the delay the round goes on without it and
            ``metrics.csv`` records it as late.
        straggler_delay_s: seconds from a round's start to a straggler's reply.
    """

    dropout_probability: float = 0.0
    straggler_probability: float = 0.0
    straggler_delay_s: float = 0.0

    def __post_init__(self) -> None:
        # Refused when the study is read, not rounds into the run.
        for name in ("dropout_probability", "straggler_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"failures.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.straggler_delay_s < 0:
            raise ValueError(f"failures.straggler_delay_s must be >= 0, got "
                             f"{self.straggler_delay_s}")


@dataclass(frozen=True)
class TrackingConfig:
    """Optional experiment tracking of a study (``[tracking]``), off by default.

    Attributes:
        mlflow: after the run, log its settings, per-round metrics and summary to an MLflow
            store inside the run directory (``<run_dir>/mlflow.db``; needs the optional
            ``mlflow`` package, skipped with a warning without it). See
            ``simulations.tracking``.
        mlflow_experiment: the MLflow experiment name.
    """

    mlflow: bool = False
    mlflow_experiment: str = "medfed"


@dataclass
class SimulationConfig:
    """A whole simulation study.

    Attributes:
        seed: seeds partitioning, initialisation and training.
        run_dir: where results go; empty means ``runs/<dataset>-<timestamp>``.
        baselines: which of ``pooled`` and ``local`` to run on the same split and budget.
        cpus_per_hospital: CPU cores each simulated hospital's Ray actor gets.
        privacy: the run's DP mechanisms (``[privacy]``), proposed by the coordinator.
        failures: simulated hospital dropouts and stragglers (``[failures]``).
        tracking: optional MLflow tracking (``[tracking]``).
        site_policy: a site privacy policy TOML every simulated hospital applies ("" : none).
        ledger_dir: where simulated hospitals keep their privacy ledgers (one SQLite file each);
            "" : ``runs/ledgers`` when ``site_policy`` is set, so budgets compose across runs.
        insecure_replayable_noise: draw every hospital's DP noise from the run's seed, so a
            study replays exactly. INSECURE: whoever knows the seed removes the noise;
            simulations only (a hospital daemon refuses it). Off: a CSPRNG at each hospital.
        ray_address: run the simulated hospitals on an existing Ray cluster, e.g.
            ``10.0.0.5:6379`` (the head's GCS address from ``ray start --head``) or ``auto``;
            "" starts a private Ray instance on this machine for the run.
    """

    seed: int = 0
    run_dir: str = ""
    baselines: list[str] = field(default_factory=lambda: ["pooled", "local"])
    cpus_per_hospital: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: DPConfig = field(default_factory=DPConfig)
    failures: FailureConfig = field(default_factory=FailureConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    site_policy: str = ""
    ledger_dir: str = ""
    insecure_replayable_noise: bool = False
    ray_address: str = ""


class ConfigError(ValueError):
    """A config file or override that names an unknown setting or gives a wrong type."""


# Settings that a study sets elsewhere: (table, key) -> where it belongs. Their defaults stay
# accepted: every run's config.toml lists them, and a study file may be made from one.
_SET_ELSEWHERE = {
    ("train", "proximal_mu"): "FedProx's weight is a strategy setting: [federation] strategy = "
                              "\"fedprox\" with [federation.options] proximal_mu; each round "
                              "sends it to the hospitals",
}


def _refuse_set_elsewhere(values: dict[str, Any], where: str) -> None:
    for (table, key), hint in _SET_ELSEWHERE.items():
        section = values.get(table)
        if not isinstance(section, dict):
            continue
        for name in (key, key.replace("_", "-")):
            if section.get(name, 0) not in (0, 0.0):
                raise ConfigError(f"{where}: {table}.{key} is not a study setting: {hint}")


def _merge(obj: Any, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(obj)}
    changes = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"{where}: unknown setting '{key}'; known: {sorted(known)}")
        current = getattr(obj, name)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{key}' must be a table")
            changes[name] = _merge(current, value, f"{where}.{key}")
        else:
            changes[name] = _coerce(current, value, f"{where}.{key}")
    return replace(obj, **changes)


def _coerce(current: Any, value: Any, where: str) -> Any:
    if isinstance(current, bool) or isinstance(value, bool):
        if not isinstance(value, bool) or not isinstance(current, bool):
            raise ConfigError(f"{where}: expected {type(current).__name__}, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if isinstance(current, list):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return list(value)
    if not isinstance(value, type(current)):
        raise ConfigError(f"{where}: expected {type(current).__name__}, got {value!r}")
    return value


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None):
    """Defaults, then the TOML file, then ``overrides`` (same nesting as the file)."""
    config = SimulationConfig()
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"{path}: cannot read the config ({err})") from err
        _refuse_set_elsewhere(values, str(path))
        config = _merge(config, values, str(path))
    if overrides:
        _refuse_set_elsewhere(overrides, "overrides")
        config = _merge(config, overrides, "overrides")
    return config


def with_overrides(config: SimulationConfig, overrides: dict[str, Any],
                   where: str = "overrides") -> SimulationConfig:
    """``config`` with ``overrides`` (same nesting as the TOML file) applied and checked."""
    _refuse_set_elsewhere(overrides, where)
    return _merge(config, overrides, where)


def config_dict(config: SimulationConfig) -> dict[str, Any]:
    """Plain nested dict (for ``config.toml`` in the run directory)."""
    return asdict(config)
