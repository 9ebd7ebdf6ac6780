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
``hospital.toml``, the default). With ``--cold`` (``clientapp_executor = "subprocess"``) each
task is instead a fresh ``python -m client.warm_exec --task`` process, as Flower's own
``flwr-clientapp`` would be, but equally guarded.

Either way a task never runs code from the run's FAB (:mod:`client.task_guard`): it runs the
installed medfed's ClientApp, or answers with a run-policy refusal. Only ClientApp tasks are
taken from the SuperNode (a FAB declaring another kind of app is never launched), runtime
dependency installation is always off, and the Hugging Face hub is offline in every task.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.context
import os
import subprocess
import sys
from pathlib import Path

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import LaunchResult, SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec

logger = logging.getLogger(__name__)

PRELOAD = ["client.parent_guard", "client.app", "client.task_guard",
           "flwr.supernode.runtime.run_clientapp"]
"""Imported once by the forkserver, so forked tasks start with them loaded (the first makes the
forkserver die with this SuperExec)."""
TASK_STARTED = "started ClientApp process"
"""Logged (with the task id and pid) as each task's process starts."""
LOCAL_PULL_BACKOFF_S = (0.05, 0.5)
"""First and largest wait (s) between a task's retries of an object not yet at the SuperNode."""


TASK_TOKEN_ENV = "MEDFED_TASK_TOKEN"
"""A cold task's Runtime API token travels in its environment, not on its command line."""
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
"""Set in the SuperExec before any task starts: no backbone name can make a task download."""


def _run_task(spec: ExecutionSpec) -> None:
    """One ClientApp task, in a process forked from the warm forkserver (as ``flwr-clientapp``,
    with the installed ClientApp only)."""
    from client.parent_guard import die_with_parent
    from client.task_guard import run_guarded_task

    # The kernel clears the forkserver's parent-death signal in its children: a task arms its
    # own, so that a killed hospital daemon leaves no task (and so no multiprocessing resource
    # tracker waiting on the task's end of its pipe) behind.
    die_with_parent()
    _poll_local_objects_quickly()
    run_guarded_task(spec.runtime_api_address, spec.token, spec.insecure,
                     spec.root_certificates_path, spec.parent_pid)


def _poll_local_objects_quickly() -> None:
    """Retry the SuperNode's objects every 50-500 ms instead of Flower's 1-10 s backoff.

    The SuperExec hands out a task as soon as its message is listed, often before the
    SuperNode holds the message's arrays; the task's first pull then fails and Flower's
    exponential backoff (1, 2, 4, 8, 10 s) added 8-17 s to every message on loopback. The
    Runtime API is local, so polling it fast is cheap; ``max_time`` (2 h) still bounds the wait.
    """
    from core.flower_compat import set_object_pull_backoff

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

    def get_eligible_capacity(self, supported_task_types: set[TaskType], *,
                              insecure: bool = False,
                              root_certificates_path: str | None = None,
                              ) -> tuple[set[TaskType], set[str]]:
        """Only ClientApp tasks: a FAB that declares another app kind is never launched."""
        del insecure, root_certificates_path
        return supported_task_types & {TaskType.CLIENT_APP}, set()

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Start one ClientApp task, forked from the forkserver (nothing else is launched)."""
        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"this hospital runs ClientApp tasks only, not "
                                       f"{spec.task_type}")
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


class ColdClientAppExecutor(WarmClientAppExecutor):
    """Each ClientApp task in a fresh Python process (``python -m client.warm_exec --task``),
    as Flower's own subprocess executor would start ``flwr-clientapp``, equally guarded."""

    def __init__(self) -> None:  # no forkserver
        self._tasks: list = []

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Start one ClientApp task as a fresh process (nothing else is launched)."""
        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"this hospital runs ClientApp tasks only, not "
                                       f"{spec.task_type}")
        argv = [sys.executable, "-m", "client.warm_exec", "--task",
                "--runtime-api-address", spec.runtime_api_address]
        if spec.parent_pid is not None:
            argv += ["--parent-pid", str(spec.parent_pid)]
        if not spec.insecure and spec.root_certificates_path:
            argv += ["--root-certificates", spec.root_certificates_path]
        try:
            task = subprocess.Popen(argv, env=os.environ | {TASK_TOKEN_ENV: spec.token})  # noqa: S603
        except OSError as err:
            logger.error("task %d: could not start a ClientApp process: %s", spec.task_id, err)
            return LaunchResult.failed(f"could not start a ClientApp process: {err}")
        self._tasks.append(task)
        logger.info("task %d: %s %d", spec.task_id, TASK_STARTED, task.pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished task processes."""
        running = []
        for task in self._tasks:
            if task.poll() is None:
                running.append(task)
            elif task.returncode:
                logger.warning("ClientApp task process %d exited with %s", task.pid,
                               task.returncode)
        self._tasks = running

    def close(self) -> None:
        """Stop tasks still running when the SuperExec stops (the SuperNode has gone)."""
        for task in self._tasks:
            task.terminate()
        for task in self._tasks:
            try:
                task.wait(timeout=5)
            except subprocess.TimeoutExpired:
                task.kill()


def run_warm_superexec(runtime_api_address: str, secret_file: Path | None,
                       parent_pid: int | None, cold: bool = False) -> None:
    """Flower's SuperExec loop against the SuperNode's Runtime API, with the warm executor
    (``cold``: a fresh process per task instead).

    The Runtime API is the SuperNode's loopback HTTP endpoint (as in Flower's default
    subprocess isolation); ``secret_file`` (shared with the SuperNode's
    ``--superexec-auth-secret-file``) authenticates this SuperExec to it.
    """
    from flwr.supercore.superexec import run_superexec as flower_superexec

    from core.flower_compat import use_superexec_executor

    os.environ.update(OFFLINE_ENV)  # before the forkserver or any task starts
    use_superexec_executor(ColdClientAppExecutor() if cold else WarmClientAppExecutor())
    flower_superexec.run_superexec(
        runtime_api_address=runtime_api_address,
        insecure=True,
        superexec_auth_secret=secret_file.read_bytes() if secret_file else None,
        parent_pid=parent_pid,
        runtime_dependency_install=False,
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
    parser.add_argument("--cold", action="store_true",
                        help="a fresh Python process per task instead of forking warm ones")
    parser.add_argument("--task", action="store_true",
                        help=f"run one ClientApp task (token in ${TASK_TOKEN_ENV}); started "
                        "by --cold")
    parser.add_argument("--root-certificates", help="with --task: the Runtime API's CA")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    if args.task:
        from client.task_guard import run_guarded_task

        os.environ.update(OFFLINE_ENV)
        token = os.environ.pop(TASK_TOKEN_ENV, "")
        if not token:
            parser.error(f"--task needs the task token in ${TASK_TOKEN_ENV}")
        run_guarded_task(args.runtime_api_address, token, args.root_certificates is None,
                         args.root_certificates, args.parent_pid)
        return
    logger.info("%s SuperExec for %s (pid %d)%s", "cold" if args.cold else "warm",
                args.runtime_api_address, os.getpid(),
                "" if args.cold else ", preloading " + ", ".join(PRELOAD))
    run_warm_superexec(args.runtime_api_address, args.superexec_auth_secret_file,
                       args.parent_pid, cold=args.cold)


if __name__ == "__main__":
    main()
