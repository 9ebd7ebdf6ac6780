"""A Flower Grid that hands messages straight to a ClientApp in this process (no SuperLink, no
threads): deterministic rounds for tests of the coordinator's loop."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


class LoopbackGrid(Grid):
    """Nodes ``1..n`` each with its own node config and persistent ``Context``."""

    def __init__(self, app: ClientApp, node_configs: list[dict]) -> None:
        self.app = app
        self.contexts = {
            i + 1: Context(run_id=1, node_id=i + 1, node_config=dict(cfg), state=RecordDict(),
                           run_config={})
            for i, cfg in enumerate(node_configs)
        }
        self._ids = itertools.count(1)
        self._run = Run.create_empty(run_id=1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LoopbackGrid answers in send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LoopbackGrid answers in send_and_receive only")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            # The SuperLink assigns message ids; a reply carries its request's id.
            msg.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            replies.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))
        return replies


@contextlib.contextmanager
def server_identity() -> Iterator[None]:
    """Flower's Message() reads the sending task's identity; a ServerApp process sets it."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
