"""The hospital's egress audit log: one JSON line per message the hospital sends.

A security officer reads it to check that nothing but the declared adapter tensors and
aggregate metrics ever left. Each line describes exactly what the reply carries::

    {"time": "...Z", "run_id": 3, "round": 2, "message_type": "train", "reply_to": "<id>",
     "tensors": [{"record": "arrays", "name": "...lora_A.weight", "shape": [4, 16],
                  "dtype": "float32", "bytes": 256}, ...],
     "tensor_bytes": 123456, "payload_sha256": "<hex>",
     "metrics": {"metrics": {"num-examples": 120, "train-loss": 0.41, ...}},
     "configs": {"site": {"fingerprint": "...", ...}},
     "privacy": {"dp-epsilon": 1.2, "dp-delta": 1e-05},
     "error": null}

``payload_sha256`` hashes, in the reply's order, each tensor's record name, tensor name, dtype,
shape and raw bytes, so the coordinator side can recompute it from what it received
(:func:`payload_sha256`). The file is opened in append mode and each line is flushed and
fsynced before the reply is returned: a line exists for every message that left.

Where: the node config's ``audit-log`` path. Not set (the simulation's default), no log is
written; a hospital daemon made by ``medfed hospital init`` always sets it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message

logger = logging.getLogger(__name__)

AUDIT_LOG_KEY = "audit-log"
"""Node-config key with the audit log's path."""
LOCAL_FAILURE_CODE = 500
"""Flower error code of a reply whose local work raised (see :func:`failure_reply`)."""


def failure_reply(request: Message, err: Exception) -> Message:
    """The error reply to ``request`` when the hospital's local work raised ``err``.

    The hospital answers (instead of letting the exception end its ClientApp) so that the
    failure reaches the coordinator's records and, through :func:`audit_reply`, the egress
    audit log as an error entry; the reason is the exception's type and message (no
    traceback, no tensors). The traceback stays in the hospital's own log.
    """
    logger.exception("local %s failed", request.metadata.message_type)
    reason = f"{type(err).__name__}: {err}"[:1000]
    return Message(Error(code=LOCAL_FAILURE_CODE, reason=reason), reply_to=request)


def payload_sha256(message: Message) -> str:
    """sha256 (hex) over every array the message carries, in record and key order."""
    digest = hashlib.sha256()
    if message.has_content():
        for record_name, record in message.content.array_records.items():
            for name, array in record.items():
                header = json.dumps([record_name, name, array.dtype, list(array.shape)])
                digest.update(header.encode())
                digest.update(array.data)
    return digest.hexdigest()


def describe_message(message: Message) -> dict[str, Any]:
    """What ``message`` carries, as a JSON-ready dict (see the module docstring)."""
    tensors: list[dict[str, Any]] = []
    metrics: dict[str, dict[str, Any]] = {}
    configs: dict[str, dict[str, Any]] = {}
    if message.has_content():
        content = message.content
        for record_name, record in content.array_records.items():
            for name, array in record.items():
                tensors.append({"record": record_name, "name": name,
                                "shape": list(array.shape), "dtype": array.dtype,
                                "bytes": len(array.data)})
        for record_name, record in content.metric_records.items():
            metrics[record_name] = {k: _plain(v) for k, v in record.items()}
        for record_name, record in content.config_records.items():
            configs[record_name] = {k: _plain(v) for k, v in record.items()}
    privacy = {k: v for values in metrics.values() for k, v in values.items()
               if k.startswith("dp-")}
    error = ({"code": message.error.code, "reason": message.error.reason}
             if message.has_error() else None)
    metadata = message.metadata
    return {
        "run_id": metadata.run_id, "message_type": metadata.message_type,
        "reply_to": metadata.reply_to_message_id,
        "tensors": tensors, "tensor_bytes": sum(t["bytes"] for t in tensors),
        "payload_sha256": payload_sha256(message),
        "metrics": metrics, "configs": configs, "privacy": privacy, "error": error,
    }


def _plain(value: Any) -> Any:
    """Record values as JSON values (bytes by size and hash only: they are not readable)."""
    if isinstance(value, bytes):
        return {"bytes": len(value), "sha256": hashlib.sha256(value).hexdigest()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def append_audit_line(path: Path, reply: Message, server_round: int | None) -> dict[str, Any]:
    """Append one line describing ``reply`` to the log at ``path``; return the entry."""
    entry = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
             "round": server_round} | describe_message(reply)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Append-only: opened with O_APPEND, one write per line, synced before the reply leaves.
    with open(path, "a", encoding="utf-8") as log:
        log.write(json.dumps(entry, sort_keys=False, allow_nan=True) + "\n")
        log.flush()
        os.fsync(log.fileno())
    return entry


def audit_reply(request: Message, reply: Message, context: Context) -> None:
    """Log ``reply`` (the answer to ``request``) if the node config names an ``audit-log``."""
    path = context.node_config.get(AUDIT_LOG_KEY)
    if not path:
        return
    server_round = None
    if request.has_content() and "config" in request.content.config_records:
        value = request.content.config_records["config"].get("server-round")
        server_round = int(value) if value is not None else None
    append_audit_line(Path(str(path)), reply, server_round)


def read_audit_log(path: Path) -> list[dict[str, Any]]:
    """Every entry of an audit log, in order."""
    with open(path, encoding="utf-8") as log:
        return [json.loads(line) for line in log if line.strip()]
