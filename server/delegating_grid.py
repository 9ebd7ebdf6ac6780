"""A Flower ``Grid`` that passes every call to another grid: the base of the coordinator's grid
wrappers (secure aggregation, the packed deployment wire), which override what they change."""

from __future__ import annotations

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
