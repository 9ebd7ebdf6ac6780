"""Every place medfed reaches past Flower's public API, in one module.

Flower 1.42's message API has no public way to set a message's id or source (the SuperLink
sets them), to build a message outside a Flower process (the runtime sets the process's task
identity), or to tune how a SuperNode's ClientApp process polls for objects. medfed needs each
of these in a few places; they live here so that a Flower upgrade that changes one fails in
``tests/test_flower_compat.py``, one test per assumption, and is fixed here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from flwr.app import Message

FLOWER_SERIES = "1.42"
"""The Flower minor version these assumptions were checked against (pyproject pins it)."""


def set_message_id(message: Message, message_id: str) -> None:
    """Give ``message`` the id a SuperLink would assign when it is pushed (in-process grids)."""
    # Metadata exposes message_id read-only; the SuperLink writes the private field.
    message.metadata.__dict__["_message_id"] = message_id


def set_source_node(message: Message, node_id: int) -> None:
    """Record ``message`` as coming from ``node_id`` (the SuperLink sends its own errors, e.g.
    "Node Unavailable", from node 1; the coordinator files them under the hospital asked)."""
    message.metadata.__dict__["_src_node_id"] = node_id


def set_task_identity(run_id: int, node_id: int = 0, task_id: int = 0) -> None:
    """Set this process's task identity, as Flower's runtime does before a ServerApp or a
    ClientApp runs; ``Message(...)`` reads the run id from it."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id


@contextlib.contextmanager
def task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> Iterator[None]:
    """:func:`set_task_identity` for the duration of a block, then the previous identity."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    set_task_identity(run_id, node_id, task_id)
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def set_object_pull_backoff(initial_s: float, cap_s: float) -> None:
    """Make Flower's object pulls retry every ``initial_s``..``cap_s`` seconds, without a limit
    on tries per object, for this process. Flower exposes no setting for it: its default
    backoff is the keyword defaults of ``pull_and_inflate_object_from_tree``."""
    from flwr.supercore.inflatable import inflatable_utils

    defaults = inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__
    defaults.update(initial_backoff=initial_s, backoff_cap=cap_s, max_tries_per_object=None)


def empty_run(run_id: int = 1):
    """A ``flwr.supercore.run.Run`` with nothing set, for grids that serve no real SuperLink."""
    from flwr.supercore.run import Run

    return Run.create_empty(run_id=run_id)


def use_superexec_executor(executor) -> None:  # noqa: ANN001 (Flower's Executor protocol)
    """Make Flower's SuperExec loop (``flwr.supercore.superexec.run_superexec``) launch tasks
    with ``executor``. Flower 1.42 builds its executor through a module-level factory and
    offers only subprocess and Kubernetes executors; replacing the factory hands it ours."""
    from flwr.supercore.superexec import run_superexec as flower_superexec

    flower_superexec.get_executor = lambda *args, **kwargs: executor
