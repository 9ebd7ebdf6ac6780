"""What every medfed strategy shares: reply bookkeeping and a check of each incoming update."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message

logger = logging.getLogger(__name__)


@dataclass
class Reply:
    """One hospital's answer in one round, as the coordinator may record it.

    Attributes:
        server_round: round number (1-based).
        phase: ``train`` or ``evaluate``.
        node_id: Flower node id of the hospital.
        metrics: the reply's metric values (empty when it failed).
        upload_bytes: bytes of array data in the reply.
        error: why the reply was not used, or empty.
        site: the hospital's ``site`` ConfigRecord (dataset fingerprint and counts), if sent.
    """

    server_round: int
    phase: str
    node_id: int
    metrics: dict[str, float] = field(default_factory=dict)
    upload_bytes: int = 0
    error: str = ""
    site: dict[str, int | str] = field(default_factory=dict)


ReplyObserver = Callable[[Reply], None]


def arrayrecord_nbytes(record: ArrayRecord) -> int:
    """Bytes of serialised array data in a record (what the update costs on the wire)."""
    return sum(len(array.data) for array in record.values())


def check_update(update: ArrayRecord, expected: ArrayRecord) -> str:
    """Why an update cannot be aggregated with ``expected``'s layout, or "" when it can.

    Checks the tensor names, shapes and dtypes, and that every value is finite.
    """
    if set(update) != set(expected):
        missing = sorted(set(expected) - set(update))[:3]
        extra = sorted(set(update) - set(expected))[:3]
        return f"tensor names differ from the global adapter (missing {missing}, extra {extra})"
    for name, array in update.items():
        reference = expected[name]
        if tuple(array.shape) != tuple(reference.shape) or array.dtype != reference.dtype:
            return (
                f"tensor '{name}' is {array.dtype}{list(array.shape)}, "
                f"expected {reference.dtype}{list(reference.shape)}"
            )
        if not np.isfinite(array.numpy()).all():
            return f"tensor '{name}' holds non-finite values"
    return ""


def split_valid_replies(
    replies: Iterable[Message],
    server_round: int,
    phase: str,
    expected: ArrayRecord | None,
    observer: ReplyObserver | None,
) -> list[Message]:
    """Replies fit for aggregation; each one, used or not, is reported to ``observer``.

    A reply is dropped (with a logged reason) when it is an error, lacks metrics or example
    count, or, for training, carries an update that fails :func:`check_update`.
    """
    valid = []
    for msg in replies:
        node = msg.metadata.src_node_id
        reply = Reply(server_round=server_round, phase=phase, node_id=node)
        if msg.has_error():
            reply.error = f"hospital error: {msg.error.reason}"
        else:
            metrics = msg.content.metric_records.get("metrics")
            reply.metrics = dict(metrics) if metrics is not None else {}
            site = msg.content.config_records.get("site")
            reply.site = dict(site) if site is not None else {}
            count = reply.metrics.get("num-examples", 0)
            if not isinstance(count, (int, float)) or not math.isfinite(count) or count <= 0:
                reply.error = "reply has no positive 'num-examples'"
            elif phase == "train":
                arrays = msg.content.array_records.get("arrays")
                if arrays is None:
                    reply.error = "training reply carries no 'arrays'"
                else:
                    reply.upload_bytes = arrayrecord_nbytes(arrays)
                    if expected is not None:
                        reply.error = check_update(arrays, expected)
        if reply.error:
            logger.warning("round %d: %s reply of node %d dropped: %s",
                           server_round, phase, node, reply.error)
        else:
            valid.append(msg)
        if observer is not None:
            observer(reply)
    return valid
