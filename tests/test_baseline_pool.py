"""The baselines run side by side in forked workers that share the parent's tensors."""

import multiprocessing
import os

import pytest
import torch

from simulations.baseline_pool import run_baselines


def test_jobs_run_in_parallel_workers_on_the_parents_data_with_a_share_of_the_cores():
    images = torch.arange(12.0).reshape(3, 4)  # in the parent only: the workers inherit it
    # Each job waits for the other: they finish only if two workers run them at once (one
    # worker taking both in turn would break the barrier).
    both_running = multiprocessing.get_context("fork").Barrier(2)

    def job(scale: float):
        def run():
            both_running.wait(timeout=120)
            return {"sum": float(images.sum() * scale), "pid": os.getpid(),
                    "threads": torch.get_num_threads()}
        return run

    results, seconds = run_baselines({"pooled": job(1.0), "local": job(2.0)}, cores=2)
    assert results["pooled"]["sum"] == 66.0 and results["local"]["sum"] == 132.0
    assert {results["pooled"]["pid"], results["local"]["pid"]}.isdisjoint({os.getpid()})
    assert results["pooled"]["pid"] != results["local"]["pid"]
    assert results["pooled"]["threads"] == results["local"]["threads"] == 1
    assert set(seconds) == {"pooled", "local"} and all(s >= 0 for s in seconds.values())


def test_one_job_or_one_core_runs_here_and_errors_reach_the_caller():
    results, _ = run_baselines({"pooled": lambda: {"pid": os.getpid()}}, cores=2)
    assert results["pooled"]["pid"] == os.getpid()
    assert run_baselines({}) == ({}, {})

    def fails():
        raise ValueError("no data")

    with pytest.raises(ValueError, match="no data"):
        run_baselines({"pooled": lambda: {}, "local": fails}, cores=2)


class _Cycle:
    """Garbage with a destructor that records which process ran it."""

    def __init__(self, log):
        self.log, self.me = log, self

    def __del__(self):
        with open(self.log, "a") as out:
            out.write(f"{os.getpid()}\n")


def test_workers_never_run_the_destructors_of_garbage_they_inherit(tmp_path):
    """A cycle left uncollected in the parent (as a failed import's traceback holding a Ray
    client is) is collected in the parent, not in a forked worker, where a destructor that
    joins a thread the child does not have would hang it."""
    log = tmp_path / "destructors.log"
    _Cycle(str(log))  # unreachable at once, but a cycle: only the collector frees it

    def collect():
        import gc

        gc.collect()  # a worker's own collection must not reach the inherited garbage
        return {"pid": os.getpid()}

    results, _ = run_baselines({"pooled": collect, "local": collect}, cores=2)
    assert {results["pooled"]["pid"], results["local"]["pid"]}.isdisjoint({os.getpid()})
    assert log.read_text().split() == [str(os.getpid())]
