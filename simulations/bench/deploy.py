"""The same small study in simulation and on Flower's deployment engine on loopback.

``python -m simulations.bench deploy`` runs the study with ``medfed simulate``'s engine, then as a
real deployment on this machine: a consortium (CA, TLS, enrolled hospital keys), one
``medfed coordinator start --study`` process (SuperLink + ServerApp) and one
``medfed hospital start`` process per hospital (SuperNode with TLS and node authentication),
each hospital holding the very partition the simulation gives it (as a MedMNIST-format ``.npz``
in its site folder). It prints both wall times and ends with
``deployment/simulation wall time: <ratio>``.

:class:`LoopbackConsortium` is the deployment half: this bench needs it, so it lives here, and
the multi-process tests (``tests/faults/harness.py`` and the deployment and attack tests)
build their consortia with it rather than with a copy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from client.site_folder import CONFIG_FILE as HOSPITAL_CONFIG
from client.site_folder import init_site_folder, load_hospital_config
from privacy.secagg.identity import ROSTER_FILE
from server.consortium import enrol, init_consortium
from simulations.config import SimulationConfig, config_dict, load_config
from simulations.processes import free_port, stop_process_group, wait_for_log

STUDY_FILE = "study.toml"


def _uint8(images) -> np.ndarray:
    """float ``(N, C, H, W)`` in [0, 1] -> uint8 ``(N, H, W)`` (C = 1) or ``(N, H, W, 3)``."""
    array = (images.numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    return array[:, 0] if array.shape[1] == 1 else array.transpose(0, 2, 3, 1)


def study_toml(config: SimulationConfig) -> str:
    """The study as the coordinator reads it: the simulation's study settings only (its
    ``[data]`` stays with the simulated hospitals)."""
    return tomli_w.dumps(_drop_empty(config_dict(config.study())))


def _drop_empty(value):
    if isinstance(value, dict):
        return {k: _drop_empty(v) for k, v in value.items() if v is not None}
    return value


def study_run_policy(config: SimulationConfig) -> str:
    """A hospital's run policy filled in for exactly this study (the template allows nothing):
    the consortium's app (``server.deployment_app``), its backbone and task, its rounds."""
    return tomli_w.dumps({
        "allowed_apps": ["medfed/medfed-app"], "allowed_backbones": [config.model.backbone],
        "allowed_tasks": [config.federation.task],
        "max_image_size": max(224, config.model.image_size),  # LiteMedSAM takes 256
        "max_evaluations_per_run": config.federation.rounds + 1,
        "max_evaluations_per_day": 2 * (config.federation.rounds + 1)})


SiteWriter = Callable[[SimulationConfig, int, Path], dict[str, Any]]
"""Writes hospital ``k``'s data into its site folder; returns the ``hospital.toml`` tables to
add (``hospital``: its data keys, e.g. ``data_npz`` or ``manifest`` and ``classes``; others such
as ``site_data``)."""


def npz_site(config: SimulationConfig, k: int, site: Path) -> dict[str, Any]:
    """Simulated hospital ``k``'s train and validation split as ``site.npz``."""
    from simulations.sites import hospital_site

    data = hospital_site(config.data, config.model.image_size, config.seed, k)
    np.savez(site / "site.npz", train_images=_uint8(data.train.images),
             train_labels=data.train.labels.numpy(), val_images=_uint8(data.val.images),
             val_labels=data.val.labels.numpy())
    return {"hospital": {"data_npz": "site.npz"}}


class LoopbackConsortium:
    """A consortium, its study and ``config.data.num_hospitals`` enrolled hospitals under
    ``root``, with helpers to start and kill their daemons (each in its own session, output to
    ``root/logs/NAME.log``).

    Hospital ``k`` is named ``hospital-k`` and holds simulated hospital ``k``'s train and
    validation split (``simulations.sites.hospital_site``), or what ``site_writer`` writes
    (e.g. ``simulations.segmentation_study.loopback_site``: NIfTI cases). Without
    ``config.site_policy`` the hospitals keep no privacy policy (the template requires DP for
    every round). With
    ``enrolled`` only the first that many hospitals are enrolled; the others have their site
    folders ready and enrol later (``medfed coordinator enroll``).
    """

    def __init__(self, root: Path, config: SimulationConfig, insecure: bool = False,
                 host: str = "127.0.0.1", enrolled: int | None = None,
                 site_writer: SiteWriter | None = None) -> None:

        self.root = Path(root).resolve()
        self.insecure = insecure
        self.port = free_port()
        self.folder = self.root / "consortium"
        self.admin_port = free_port()
        init_consortium(self.folder, "loopback", host=host, port=self.port,
                        admin_port=self.admin_port)
        self.study = self.folder / STUDY_FILE
        self.study.write_text(study_toml(config))
        self.run_dir = self.folder / "runs" / self.study.stem
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self.sites: list[Path] = []
        self.procs: dict[str, subprocess.Popen] = {}
        for k in range(config.data.num_hospitals):
            site = self.root / f"hospital-{k}"
            init_site_folder(site, f"hospital-{k}", superlink=f"localhost:{self.port}")
            (site / "run-policy.toml").write_text(study_run_policy(config))
            shutil.copy(self.folder / "ca" / "ca.pem", site / "ca.pem")
            tables = (site_writer or npz_site)(config, k, site)
            hospital = load_hospital_config(site).__dict__ | tables.pop("hospital") | {
                "runtime_port": free_port(),
                # All daemons share this machine: one thread each, as the simulation gives
                # each hospital one CPU (cpus_per_hospital).
                "cpu_threads": config.cpus_per_hospital}
            if config.site_policy:
                shutil.copy(config.site_policy, site / "privacy-policy.toml")
            else:
                hospital["privacy_policy"] = ""
            (site / HOSPITAL_CONFIG).write_text(tomli_w.dumps({"hospital": hospital} | tables))
            if enrolled is None or k < enrolled:  # the others enrol later (late joiners)
                enrol(self.folder, f"hospital-{k}", site / "node.pub")
            self.sites.append(site)
        for site in self.sites:  # the roster of all enrolled hospitals goes with ca.pem
            shutil.copy(self.folder / ROSTER_FILE, site / ROSTER_FILE)

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        # Wide: the CLI's log lines are not wrapped, so a line can be looked for whole.
        env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="1000")
        with open(self.log(name), "a") as out:  # a file, not a pipe: helpers inherit it
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, cwd=self.root)
        self.procs[name] = proc
        return proc

    def start_coordinator(self, study: Path | None = None) -> subprocess.Popen:
        """``medfed coordinator start DIR --study study.toml`` (or ``study``: a copy under
        another name runs in its own run directory, ``runs/<stem>``)."""
        return self._start("coordinator", [
            sys.executable, "-m", "medfed_cli.main", "coordinator", "start", str(self.folder),
            "--study", str(study or self.study), *(["--insecure"] if self.insecure else [])])

    def study_copy(self, name: str) -> Path:
        """The study under another name (its own run directory, ``runs/<name>``)."""
        path = self.folder / f"{name}.toml"
        path.write_text(self.study.read_text())
        return path

    def start_hospital(self, k: int, retry_backoff_s: float | None = None) -> subprocess.Popen:
        """``medfed hospital start --dir hospital-k`` (a SuperNode; runs until stopped), with
        ``--retry-backoff retry_backoff_s`` (seconds) when given."""
        backoff = [] if retry_backoff_s is None else ["--retry-backoff", str(retry_backoff_s)]
        return self._start(f"hospital-{k}", [
            sys.executable, "-m", "medfed_cli.main", "hospital", "start", "--dir",
            str(self.sites[k]), *backoff, *(["--insecure"] if self.insecure else [])])

    def wait_for_log(self, name: str, text: str, timeout_s: float) -> bool:
        """Wait until ``text`` appears in daemon ``name``'s log."""
        return wait_for_log(self.log(name), text, timeout_s)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to daemon ``name`` and every process it started; wait for it."""
        proc = self.procs.pop(name, None)
        if proc is not None:
            stop_process_group(proc, sig, grace_s=20)

    def stop_all(self) -> None:
        """Stop every daemon still running (SIGTERM, then SIGKILL)."""
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)

    def run(self, timeout_s: float) -> int:
        """Start the coordinator and every hospital; wait for the coordinator to end.

        Returns:
            The coordinator's exit code (the results are in :attr:`run_dir`).
        """
        coordinator = self.start_coordinator()
        if not self.wait_for_log("coordinator", "registered hospital-", 120):
            raise RuntimeError(f"the coordinator did not register the hospitals; see "
                               f"{self.log('coordinator')}")
        for k in range(len(self.sites)):
            self.start_hospital(k)
        try:
            return coordinator.wait(timeout=timeout_s)
        finally:
            self.procs.pop("coordinator", None)


def default_study() -> SimulationConfig:
    """The benchmark's small study: 3 hospitals, 32 px, 300 training examples, 2 rounds."""
    return load_config(overrides={
        "seed": 0, "baselines": [],
        "data": {"dataset": "pneumoniamnist", "num_hospitals": 3, "partition": "iid",
                 "max_train_examples": 300, "max_test_examples": 200},
        "model": {"image_size": 32, "lora_r": 4, "lora_alpha": 8},
        "train": {"batch_size": 16, "local_steps": 5},
        "federation": {"rounds": 2, "min_hospitals": 2, "round_timeout_s": 300.0},
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench deploy")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="keep the folders here (default: temporary)")
    parser.add_argument("--secure-aggregation", action="store_true",
                        help="both runs under secure aggregation (SecAgg+)")
    args = parser.parse_args(argv)
    from rich.console import Console

    from simulations.runner import run_study

    config = default_study()
    config = replace(config, data=replace(config.data, num_hospitals=args.hospitals),
                     federation=replace(config.federation, rounds=args.rounds,
                                        secure_aggregation=replace(
                                            config.federation.secure_aggregation,
                                            enabled=args.secure_aggregation)))
    root = Path(args.keep or tempfile.mkdtemp(prefix="medfed-deploy-"))
    root.mkdir(parents=True, exist_ok=True)
    console = Console()

    started = time.monotonic()
    summary = run_study(replace(config, run_dir=str(root / "simulation")), console)
    simulation_s = time.monotonic() - started
    console.print(f"simulation: {args.hospitals} hospitals, {args.rounds} rounds, test AUC "
                  f"{summary['federated']['auc']:.3f}, wall time {simulation_s:.1f} s")

    consortium = LoopbackConsortium(root / "deployment", config)
    started = time.monotonic()
    try:
        code = consortium.run(timeout_s=900)
    finally:
        consortium.stop_all()
    deployment_s = time.monotonic() - started
    import json

    summary_file = consortium.run_dir / "summary.json"
    if code != 0 or not summary_file.exists():
        console.print(f"[red]deployment did not finish (exit {code}); logs in "
                      f"{root / 'deployment' / 'logs'}")
        return 1
    validation = json.loads(summary_file.read_text())["validation"]
    console.print(f"deployment (TLS, node authentication, one process per daemon): combined "
                  f"validation AUC {validation.get('auc', float('nan')):.3f} (the coordinator "
                  f"holds no test set), wall time {deployment_s:.1f} s")
    console.print(f"deployment/simulation wall time: {deployment_s / simulation_s:.2f}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0
