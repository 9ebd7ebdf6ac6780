"""Messages and a Grid for calling a ClientApp in-process, without a Flower runtime.

Outside Flower a bare ``Message`` has no run id and Flower refuses it, so these build one with
explicit metadata. Used by benchmarks and tests; calling the ClientApp this way takes under a
second.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from core.flower_compat import make_message, set_message_id, set_task_identity


def message_with_metadata(
    kind: str,
    content: RecordDict,
    *,
    run_id: int = 1,
    src_node_id: int = 0,
    dst_node_id: int = 7,
    group_id: str = "1",
    message_id: str | None = None,
) -> Message:
    """A Message of type ``kind`` (``train``/``evaluate``) carrying ``content``."""
    metadata = Metadata(
        run_id=run_id, message_id=message_id or f"{kind}-{src_node_id}-{dst_node_id}",
        src_node_id=src_node_id, dst_node_id=dst_node_id, reply_to_message_id="",
        group_id=group_id, created_at=time.time(), ttl=600.0, message_type=kind,
    )
    return make_message(metadata, content)


def coordinator_message(
    kind: str, arrays: ArrayRecord, config: ConfigRecord, **metadata
) -> Message:
    """What the coordinator sends a hospital: the global adapter and the round's config."""
    return message_with_metadata(
        kind, RecordDict({"arrays": arrays, "config": config}), **metadata)


class InProcessGrid(Grid):
    """A Flower ``Grid`` that delivers each message to a ClientApp in this process.

    Every node id has its own ``Context`` (node config and a state kept across messages, as a
    SuperNode keeps it), so a ServerApp's strategy - or a multi-stage protocol such as secure
    aggregation - runs unchanged and fast, without Ray or a SuperLink. A ClientApp that raises
    answers with an error reply, as Flower's runtimes do.

    Args:
        client_app: the hospitals' ClientApp.
        node_configs: node id -> that hospital's node config.
        run_id: the run's id in message metadata.
    """

    def __init__(self, client_app: ClientApp, node_configs: dict[int, dict[str, Any]],
                 run_id: int = 1) -> None:
        self.client_app = client_app
        self.contexts = {node: Context(run_id=run_id, node_id=node, node_config=dict(config),
                                       state=RecordDict(), run_config={})
                         for node, config in node_configs.items()}
        self._run_id = run_id
        self._replies: dict[str, Message] = {}
        # Flower's runtime sets the process's task identity; Message() reads it.
        set_task_identity(run_id, 0, 0)

    def set_run(self, run: Any) -> None:
        """Runs are fixed at construction."""

    @property
    def run(self) -> Any:
        return None

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            set_message_id(msg, str(uuid.uuid4()))
            node = msg.metadata.dst_node_id
            try:
                reply = self.client_app(msg, self.contexts[node])
            except Exception as err:  # noqa: BLE001 (a failing hospital is an error reply)
                reply = Message(Error(code=500, reason=f"{type(err).__name__}: {err}"),
                                reply_to=msg)
            if reply is not None:
                self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))
