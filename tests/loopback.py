"""A Flower Grid that hands messages straight to a ClientApp in this process (no SuperLink, no
threads): deterministic rounds for tests of the coordinator's loop."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from core.flower_compat import empty_run, set_message_id, task_identity


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
        self._run = empty_run(run_id=1)

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
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
            set_message_id(msg, f"m{next(self._ids)}")
            replies.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))
        return replies


@contextlib.contextmanager
def server_identity() -> Iterator[None]:
    """Flower's Message() reads the sending task's identity; a ServerApp process sets it."""
    with task_identity(run_id=1, node_id=0, task_id=1):
        yield
