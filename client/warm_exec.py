"""The hospital daemon's SuperExec: each ClientApp task starts from a warm, pre-imported process.

Flower's SuperNode runs every message it receives (train, evaluate, each secure-aggregation
stage) in a fresh ``flwr-clientapp`` process, and importing medfed's ClientApp (torch, peft,
MONAI) costs about 10 s of CPU each time: most of a round on loopback. Started with
``flower-supernode --isolation process``, the SuperNode leaves task processes to an external
SuperExec. This one is Flower's own SuperExec loop (``run_superexec``) with one change: its
executor forks each task from a :mod:`multiprocessing` *forkserver* that imported the ClientApp
once, so a task process is ready in well under a second. Each task still runs in its own
process (a crash or leak in one message cannot reach the next) and runs Flower's own
``run_clientapp``; the forkserver itself never sees a message.

    python -m client.warm_exec --runtime-api-address 127.0.0.1:9094 \\
        --superexec-auth-secret-file SECRET --parent-pid SUPERNODE_PID

``medfed hospital start`` starts it next to the SuperNode (``clientapp_executor = "warm"`` in
``hospital.toml``, the default).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.context
import os
from pathlib import Path

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import LaunchResult, SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec

logger = logging.getLogger(__name__)

PRELOAD = ["client.app", "flwr.supernode.runtime.run_clientapp"]
"""Imported once by the forkserver, so forked tasks start with them loaded."""
TASK_STARTED = "started ClientApp process"
"""Logged (with the task id and pid) as each task's process starts."""
LOCAL_PULL_BACKOFF_S = (0.05, 0.5)
"""First and largest wait (s) between a task's retries of an object not yet at the SuperNode."""


def _run_task(spec: ExecutionSpec) -> None:
    """One ClientApp task, in a process forked from the warm forkserver (as ``flwr-clientapp``)."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    _poll_local_objects_quickly()
    run_clientapp(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure),
        parent_pid=spec.parent_pid,
        runtime_dependency_install=spec.runtime_dependency_install,
    )


def _poll_local_objects_quickly() -> None:
    """Retry the SuperNode's objects every 50-500 ms instead of Flower's 1-10 s backoff.

    The SuperExec hands out a task as soon as its message is listed, often before the
    SuperNode holds the message's arrays; the task's first pull then fails and Flower's
    exponential backoff (1, 2, 4, 8, 10 s) added 8-17 s to every message on loopback. The
    Runtime API is local, so polling it fast is cheap; ``max_time`` (2 h) still bounds the wait.
    """
    from models.flower_compat import set_object_pull_backoff

    set_object_pull_backoff(*LOCAL_PULL_BACKOFF_S)


def _warm_up() -> None:
    """Target of the first (empty) process: starting it starts the forkserver's imports."""


class WarmClientAppExecutor(SubprocessExecutor):
    """Flower's executor protocol; ClientApp tasks are forked from a pre-imported forkserver.

    Other task types (none arrive at a SuperNode) fall back to Flower's subprocess launch.
    """

    def __init__(self, preload: list[str] | None = None) -> None:
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(PRELOAD if preload is None else preload)
        self._tasks: list[multiprocessing.context.ForkServerProcess] = []
        warm = self._context.Process(target=_warm_up, name="medfed-warm-up")
        warm.start()  # pays the imports now, before the first message waits for them
        warm.join()

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Start one task: forked from the forkserver for a ClientApp, else as Flower does."""
        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        try:
            task = self._context.Process(target=_run_task, args=(spec,),
                                         name=f"medfed-clientapp-{spec.task_id}")
            task.start()
        except Exception as err:  # noqa: BLE001 - e.g. out of processes or memory: report
            # it to Flower (the task then expires) rather than stop the daemon's SuperExec.
            logger.error("task %d: could not start a ClientApp process: %s", spec.task_id, err)
            return LaunchResult.failed(f"could not fork a ClientApp process: {err}")
        self._tasks.append(task)
        logger.info("task %d: %s %d", spec.task_id, TASK_STARTED, task.pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished task processes (no zombies over a daemon's months)."""
        running = []
        for task in self._tasks:
            if task.is_alive():
                running.append(task)
            else:
                task.join()
                if task.exitcode:
                    logger.warning("ClientApp task process %s exited with %s",
                                   task.name, task.exitcode)
        self._tasks = running

    def close(self) -> None:
        """Stop tasks still running when the SuperExec stops (the SuperNode has gone)."""
        for task in self._tasks:
            task.terminate()
        for task in self._tasks:
            task.join(timeout=5)


def run_warm_superexec(runtime_api_address: str, secret_file: Path | None,
                       parent_pid: int | None) -> None:
    """Flower's SuperExec loop against the SuperNode's Runtime API, with the warm executor.

    The Runtime API is the SuperNode's loopback HTTP endpoint (as in Flower's default
    subprocess isolation); ``secret_file`` (shared with the SuperNode's
    ``--superexec-auth-secret-file``) authenticates this SuperExec to it.
    """
    from flwr.supercore.superexec import run_superexec as flower_superexec

    from models.flower_compat import use_superexec_executor

    use_superexec_executor(WarmClientAppExecutor())
    flower_superexec.run_superexec(
        runtime_api_address=runtime_api_address,
        insecure=True,
        superexec_auth_secret=secret_file.read_bytes() if secret_file else None,
        parent_pid=parent_pid,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m client.warm_exec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's Runtime API (loopback), HOST:PORT")
    parser.add_argument("--superexec-auth-secret-file", type=Path,
                        help="the secret the SuperNode was given")
    parser.add_argument("--parent-pid", type=int,
                        help="stop when this process (the SuperNode) exits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    logger.info("warm SuperExec for %s (pid %d), preloading %s", args.runtime_api_address,
                os.getpid(), ", ".join(PRELOAD))
    run_warm_superexec(args.runtime_api_address, args.superexec_auth_secret_file,
                       args.parent_pid)


if __name__ == "__main__":
    main()
