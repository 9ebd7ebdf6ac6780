"""A simulation attaches to an existing Ray cluster (``ray_address``), not a private one.

The test starts a real Ray head on loopback (``ray start --head --block``) in its own temp dir,
runs a tiny study against it, and finds the hospitals' actor logs in that head's session.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from simulations.config import load_config
from simulations.processes import free_port, stop_process_group, wait_for_port
from simulations.runner import backend_config


def _stop(proc: subprocess.Popen) -> None:
    """Stop the head we started and everything under it, by process id (never by name)."""
    family = []
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        pass
    stop_process_group(proc, grace_s=30)  # ray start --block stops its processes on SIGTERM
    _, alive = psutil.wait_procs(family, timeout=10)
    for child in alive:
        child.kill()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    temp_dir = tmp_path_factory.mktemp("rayhead")
    port = free_port()
    ray = Path(sys.executable).with_name("ray")
    log = open(temp_dir / "head.log", "w")  # noqa: SIM115 - closed after the head stops
    proc = subprocess.Popen(
        [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for_port(port, proc, timeout_s=90)
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        _stop(proc)
        log.close()


def test_backend_config_passes_the_address():
    assert "address" not in backend_config(load_config())["init_args"]
    config = load_config(None, {"ray_address": "10.0.0.5:6379"})
    assert backend_config(config)["init_args"]["address"] == "10.0.0.5:6379"


@pytest.mark.slow
def test_study_runs_on_an_existing_ray_head(ray_head, tmp_path):
    from simulations.runner import run_study

    address, head_dir = ray_head
    config = load_config(None, {
        "run_dir": str(tmp_path / "run"), "baselines": [], "ray_address": address,
        "data": {"num_hospitals": 2, "partition": "iid", "max_train_examples": 160,
                 "max_test_examples": 80},
        "model": {"image_size": 32, "lora_r": 4, "lora_alpha": 8},
        "federation": {"rounds": 1, "min_hospitals": 2},
        "train": {"batch_size": 16, "local_epochs": 1, "lr": 1e-3},
    })
    summary = run_study(config)
    assert math.isfinite(summary["federated"]["auc"])
    # The hospitals ran as actors of *that* head: their worker logs are in its session folder.
    logs = list(head_dir.glob("session_*/logs/worker-*"))
    assert logs, f"no worker logs under {head_dir}: the run did not use the given cluster"
    actors = [p for p in logs if "ClientAppActor" in p.read_text(errors="ignore")]
    assert actors, "no ClientAppActor ran on the given Ray head"
