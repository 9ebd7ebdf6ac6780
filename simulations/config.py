"""A simulation's settings: a study (``server.study.Study``) plus its simulated hospitals.

A simulation file is a study file (``classes``, ``[model]``, ``[train]``,
``[federation]``, ``[privacy]``, ``[evaluation]``) with the settings of the simulation around
it: ``[data]`` (which dataset and how it is partitioned), ``[failures]``, ``[tracking]`` and
top-level ``seed``, ``run_dir``, ``baselines``, ``cpus_per_hospital``, ``site_policy``,
``ledger_dir``, ``ray_address``. The coordinator's code receives only the study
(``SimulationConfig.study()``). Both are read by the one typed reader of ``core.settings``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.settings import SettingsError, load_settings, read_toml, setting
from server.study import Study, check_study_values


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
    num_hospitals: int = setting(5, ge=1)
    partition: str = setting("dirichlet", choices=("iid", "dirichlet", "quantity"))
    alpha: float = setting(0.5, gt=0.0)
    size_distribution: str = setting("lognormal", choices=("lognormal", "powerlaw"))
    size_skew: float = setting(1.0, ge=0.0)
    shift: str = setting("none", choices=("none", "scanners"))
    shift_strength: float = setting(1.0, ge=0.0)
    val_fraction: float = setting(0.1, gt=0.0, lt=1.0)
    max_train_examples: int = setting(0, ge=0)
    max_test_examples: int = setting(0, ge=0)
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

    dropout_probability: float = setting(0.0, ge=0.0, le=1.0)
    straggler_probability: float = setting(0.0, ge=0.0, le=1.0)
    straggler_delay_s: float = setting(0.0, ge=0.0)

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
class SimulationConfig(Study):
    """A simulation: a study (its settings first, see ``server.study.Study``) and the settings
    of its simulated hospitals.

    Attributes:
        seed: seeds partitioning, the test subset and the shift profiles (``train.seed`` seeds
            the initial adapter and the hospitals' training).
        run_dir: where results go; empty means ``runs/<dataset>-<timestamp>``.
        baselines: which of ``pooled`` and ``local`` to run on the same split and budget; both
            publish the adapter of their best validation round, as the federated run does.
        cpus_per_hospital: CPU cores each simulated hospital's Ray actor gets.
        data: the dataset and how it is spread over the simulated hospitals (``[data]``).
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
    baselines: list[str] = setting(default_factory=lambda: ["pooled", "local"],
                                   items=("pooled", "local"))
    cpus_per_hospital: int = setting(1, ge=1)
    data: DataConfig = field(default_factory=DataConfig)
    failures: FailureConfig = field(default_factory=FailureConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    site_policy: str = ""
    ledger_dir: str = ""
    insecure_replayable_noise: bool = False
    ray_address: str = ""


ConfigError = SettingsError
"""A config file or override with an unknown setting, a wrong type or a value out of range."""


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None):
    """Defaults, then the TOML file, then ``overrides`` (same nesting as the file)."""
    config = SimulationConfig()
    if path is not None:
        values = read_toml(Path(path))
        check_study_values(values, str(path))
        config = load_settings(SimulationConfig, values, str(path), config)
    if overrides:
        check_study_values(overrides, "overrides")
        config = load_settings(SimulationConfig, overrides, "overrides", config)
    return _refuse_deployment_only(config, str(path) if path is not None else "overrides")


def _refuse_deployment_only(config: SimulationConfig, where: str) -> SimulationConfig:
    """A simulation scores on its dataset's test split; a coordinator-held test manifest in its
    study would be silently unused, so it is refused."""
    if config.evaluation.test_manifest:
        raise ConfigError(
            f"{where}: evaluation.test_manifest = '{config.evaluation.test_manifest}' is read "
            "by a deployed coordinator only; a simulation scores on its dataset's test split. "
            "Remove it to simulate this study (keep it for 'medfed coordinator start').")
    return config


def with_overrides(config: SimulationConfig, overrides: dict[str, Any],
                   where: str = "overrides") -> SimulationConfig:
    """``config`` with ``overrides`` (same nesting as the TOML file) applied and checked."""
    check_study_values(overrides, where)
    return _refuse_deployment_only(load_settings(SimulationConfig, overrides, where, config), where)


def config_dict(config: SimulationConfig) -> dict[str, Any]:
    """Plain nested dict (for ``config.toml`` in the run directory)."""
    return asdict(config)
