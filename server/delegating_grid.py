"""Flower ``Grid`` wrappers' bases: one that passes every call to another grid, and one that
also waits for replies through its own push and pull. The coordinator's wrappers (secure
aggregation, the packed deployment wire) and the simulation's (stragglers) override what they
change."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid


class DelegatingGrid(Grid):
    """Delegates everything to ``grid``."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run) -> None:  # noqa: ANN001 (Flower's Run)
        self._grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):  # noqa: ANN201
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class PollingGrid(DelegatingGrid):
    """A :class:`DelegatingGrid` whose ``send_and_receive`` goes through this grid's own
    ``push_messages`` and ``pull_messages`` (so a subclass's overrides of those apply), looking
    for replies every ``poll_interval_s`` seconds (Flower's grids: every 3 s on the deployment
    engine)."""

    def __init__(self, grid: Grid, poll_interval_s: float) -> None:
        super().__init__(grid)
        self.poll_interval_s = poll_interval_s

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``; return the replies that came within ``timeout`` seconds."""
        pending = set(self.push_messages(messages))
        pending.discard(None)  # a message the SuperLink did not take gets no reply
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            got = list(self.pull_messages(pending))
            replies += got
            pending -= {reply.metadata.reply_to_message_id for reply in got}
            if pending:
                time.sleep(self.poll_interval_s)
        return replies
