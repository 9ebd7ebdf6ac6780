"""One hospital's reply as the coordinator records it, its size, and the check of each incoming
update; every strategy uses them."""

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


def update_norm(update: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of ``update - reference`` over all tensors (the size of a hospital's step).

    Both records must hold the same names and shapes (see :func:`check_update`).
    """
    total = 0.0
    for name, array in update.items():
        delta = array.numpy().astype(np.float64) - reference[name].numpy().astype(np.float64)
        total += float(np.sum(delta * delta))
    return math.sqrt(total)


def check_update(update: ArrayRecord, expected: ArrayRecord, max_norm: float = 0.0) -> str:
    """Why an update cannot be aggregated with ``expected``'s layout, or "" when it can.

    Checks the tensor names, shapes and dtypes, that every value is finite and, when
    ``max_norm`` > 0, that the step ``||update - expected||`` (L2) is at most ``max_norm``.
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
    if max_norm > 0:
        norm = update_norm(update, expected)
        if norm > max_norm:
            return f"update norm {norm:.4g} exceeds the bound {max_norm:.4g} (max_update_norm)"
    return ""


def in_stable_order(replies: list[Message]) -> list[Message]:
    """Replies sorted by the hospital id their metrics give (simulations), else by node id.

    Floating-point sums depend on their order; replies arrive in whatever order the hospitals
    finish, so without this the same seed could give a different global adapter run to run.
    """
    def key(msg: Message) -> tuple[int, int]:
        metrics = msg.content.metric_records.get("metrics") if not msg.has_error() else None
        hospital = metrics.get("hospital-id") if metrics is not None else None
        if isinstance(hospital, int | float) and math.isfinite(hospital):
            return (0, int(hospital))
        return (1, msg.metadata.src_node_id)

    return sorted(replies, key=key)


def split_valid_replies(
    replies: Iterable[Message],
    server_round: int,
    phase: str,
    expected: ArrayRecord | None,
    observer: ReplyObserver | None,
    max_norm: float = 0.0,
) -> list[Message]:
    """Replies fit for aggregation, in :func:`in_stable_order`; each one, used or not, is
    reported to ``observer``.

    A reply is dropped (with a logged reason) when it is an error, lacks metrics or example
    count, or, for training, carries an update that fails :func:`check_update` (``max_norm``:
    its bound on the update's norm, 0 for none).
    """
    valid = []
    for msg in in_stable_order(list(replies)):
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
                    # Under secure aggregation the coordinator counts what the hospital sent
                    # over all stages (masked vector, keys, shares) in this metric.
                    reply.upload_bytes = int(reply.metrics.get("secagg-upload-bytes",
                                                               arrayrecord_nbytes(arrays)))
                    if expected is not None:
                        reply.error = check_update(arrays, expected, max_norm)
        if reply.error:
            logger.warning("round %d: %s reply of node %d dropped: %s",
                           server_round, phase, node, reply.error)
        else:
            valid.append(msg)
        if observer is not None:
            observer(reply)
    return valid
