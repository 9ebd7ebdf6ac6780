"""Messages for calling a ClientApp in-process, without a Flower runtime.

Outside Flower a bare ``Message`` has no run id and Flower refuses it, so these build one with
explicit metadata. Used by benchmarks and tests; calling the ClientApp this way takes under a
second.
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata


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
