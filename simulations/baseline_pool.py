"""The pooled and local baselines side by side, each in its own process.

After the federated run the baselines are two independent trainings of about the same size (all
hospitals' data pooled; each hospital's alone). One process each, with the machine's cores
shared between them, finishes sooner than both in turn with every core each: a small network's
training step scales poorly past one thread. The worker processes are forked from this one, so
they share the decoded and resized images already in memory instead of decoding them again.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

logger = logging.getLogger(__name__)

BaselineJob = Callable[[], dict[str, Any]]


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def _timed(job: BaselineJob) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    result = job()
    return result, time.monotonic() - started


def run_baselines(jobs: dict[str, BaselineJob], cores: int | None = None,
                  waiting: Callable[[], AbstractContextManager[Any]] = nullcontext,
                  ) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Run each named baseline ``jobs[name]()``; with more than one, in parallel processes.

    Args:
        jobs: baseline name -> a function that trains it and returns its metrics (run in a
            forked worker, so it may close over tensors and configs without pickling them).
        cores: CPU cores to share among the workers (default: all of this machine's).
        waiting: a context entered while the baselines train (a progress spinner); entered only
            after the workers have forked, so that no display thread is copied into them.

    Returns:
        Each baseline's metrics, and the seconds each took, by name.
    """
    if not jobs:
        return {}, {}
    cores = cores or os.cpu_count() or 1
    if len(jobs) == 1 or cores == 1:
        results, seconds = {}, {}
        with waiting():
            for name, job in jobs.items():
                results[name], seconds[name] = _timed(job)
        return results, seconds
    workers = min(len(jobs), cores)
    _JOBS.update(jobs)
    # Garbage this process still holds (e.g. a failed import's traceback keeping a Ray client
    # of the federated run alive) is collected here, where its destructors work; the rest is
    # frozen so that no worker ever collects it: a destructor that joins a thread (Ray's) waits
    # forever in a forked child, which has no such thread.
    gc.collect()
    gc.freeze()
    try:
        # Fork: the workers inherit the decoded dataset and the jobs' closures. Each uses its
        # share of the cores; single-threaded torch does not touch the parent's OpenMP pool.
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                 initializer=_set_threads,
                                 initargs=(max(1, cores // workers),)) as pool:
            futures = {name: pool.submit(_run_job, name) for name in jobs}  # forks here
            with waiting():
                done = {name: future.result() for name, future in futures.items()}
    finally:
        gc.unfreeze()
        _JOBS.clear()
    return ({name: result for name, (result, _) in done.items()},
            {name: seconds for name, (_, seconds) in done.items()})


# The jobs, visible to the forked workers by name (closures do not pickle; names do).
_JOBS: dict[str, BaselineJob] = {}


def _run_job(name: str) -> tuple[dict[str, Any], float]:
    return _timed(_JOBS[name])
