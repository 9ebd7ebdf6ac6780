"""The coordinator's Grid for the deployment engine: packed adapters and prompt replies.

Two costs of Flower 1.42's deployment transport that a LoRA round does not need:

- every tensor of a message is its own object and HTTP request at each hop; the adapter goes
  packed into one array (``core.wire``; the hospital's ``client.wire.packed_wire_mod``
  unpacks it and packs its reply);
- ``send_and_receive`` polls the SuperLink for replies every 3 s; here every
  ``poll_interval_s`` (one small request to the SuperLink on loopback or the consortium link).

Replies are unpacked before the strategy sees them, so update checks, strategies and records
work on named tensors exactly as in simulation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from core.wire import pack_content, unpack_content
from server.delegating_grid import PollingGrid

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.25


class PackedWireGrid(PollingGrid):
    """Delegates to ``grid``; packs outgoing adapters, unpacks replies, polls every
    ``poll_interval_s`` seconds."""

    def __init__(self, grid: Grid, poll_interval_s: float = POLL_INTERVAL_S) -> None:
        super().__init__(grid, poll_interval_s)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for message in messages:
            if not message.has_error():
                pack_content(message.content)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            if not reply.has_error():
                try:
                    unpack_content(reply.content)
                except ValueError as err:
                    # Left packed: the strategy's update check drops it (wrong tensor names).
                    logger.warning("node %s sent a malformed packed adapter: %s",
                                   reply.metadata.src_node_id, err)
        return replies
