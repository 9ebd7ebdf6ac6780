"""The hospital's egress audit log: one JSON line per message the hospital sends.

A security officer reads it to check that nothing but the declared adapter tensors and
aggregate metrics ever left. Each line describes exactly what the reply carries::

    {"time": "...Z", "run_id": 3, "round": 2, "message_type": "train", "reply_to": "<id>",
     "tensors": [{"record": "arrays", "name": "...lora_A.weight", "shape": [4, 16],
                  "dtype": "float32", "bytes": 256}, ...],
     "tensor_bytes": 123456, "payload_sha256": "<hex>",
     "metrics": {"metrics": {"num-examples": 120, "dp-epsilon": 1.2, ...}},
     "configs": {"site": {"fingerprint": "...", ...}},
     "privacy": {"dp-epsilon": 1.2, "dp-delta": 1e-05},
     "error": null, "prev_sha256": "<hex>", "sha256": "<hex>"}

``payload_sha256`` hashes, in the reply's order, each tensor's record name, tensor name, dtype,
shape and raw bytes, so the coordinator side can recompute it from what it received
(:func:`payload_sha256`).

Every reply is written, error or not, before it leaves: the line is flushed and fsynced
first. Three points see to it: :func:`audited_mod` (the ClientApp's outermost mod) for every
message a handler is registered for; :class:`AuditedClientApp` for a message Flower's dispatch
refuses before any mod runs (an unregistered message type); and, at a hospital daemon,
``client.task_guard`` for a reply Flower's own task runtime makes (the app failed to load): it
writes the line, category only, just before the reply is pushed. A reply whose line cannot be
written is not sent.

Tamper evidence: each line carries ``prev_sha256``, the sha256 of the previous line's bytes
(without its newline; 64 zeros on the first line), and ``sha256``, the hash of its own entry
without that field; a head file beside the log (``<log>.head``) records the line count and the
last line's hash. :func:`verify_audit_log` (``medfed hospital audit verify --log PATH``) names
the first line where the chain breaks: an edited line fails its own hash (or, if its hash was
recomputed, the next line's ``prev_sha256``), a removed line breaks the chain at the line that
followed it, and lines cut off the end show against the head file, which must be there (a log
whose head file was deleted fails: that is how lines cut off the end would be hidden). Log and
head are created 0600. The chain has no secret key: it proves the log is the one written
unless someone rewrote every line after the change (and the head file); send the head hash off
the machine (e.g. to syslog) to rule that out.

Error replies carry a category and counts only (:func:`failure_reply`): file paths, patient
names and UIDs stay in the hospital's own log.

Where: the node config's ``audit-log`` path. Not set (the simulation's default), no log is
written; a hospital daemon made by ``medfed hospital init`` always sets it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from client.classes import ClassMismatch
from client.data.problems import ManifestError, SiteDataError
from models.finite import NonFiniteError
from models.registry import WeightsMismatchError
from privacy import hash_chain
from privacy.ledger import LedgerIntegrityError
from privacy.secagg.wire import RECORD as SECAGG_RECORD

logger = logging.getLogger(__name__)

AUDIT_LOG_KEY = "audit-log"
"""Node-config key with the audit log's path."""
LOCAL_FAILURE_CODE = 500
"""Flower error code of a reply whose local work raised (see :func:`failure_reply`)."""
_AUDITED = "_medfed_audited"
"""Attribute set on a reply once its audit line is written (see :func:`is_audited`)."""


def failure_reply(request: Message, err: Exception) -> Message:
    """The error reply to ``request`` when the hospital's local work raised ``err``.

    The hospital answers (instead of letting the exception end its ClientApp) so that the
    failure reaches the coordinator's records and the egress audit log as an error entry. The
    coordinator gets a category and counts only (:func:`failure_category`), never the
    exception's message, which may name files, patients or UIDs; the message and traceback go
    to the hospital's own log.
    """
    logger.exception("local %s failed", request.metadata.message_type)
    return Message(Error(code=LOCAL_FAILURE_CODE, reason=failure_category(err)),
                   reply_to=request)


def failure_category(err: Exception) -> str:
    """What the coordinator may learn of a local failure: a category, counts, the type.

    Only three messages pass on: :class:`models.registry.WeightsMismatchError` names the
    backbone and two weight hashes, which the run itself pinned,
    :class:`client.classes.ClassMismatch` names class names the hospital declared in its
    ``hospital.toml`` and the study's (no row, file or patient), and
    :class:`models.finite.NonFiniteError` names adapter tensors and counts.
    """
    if isinstance(err, WeightsMismatchError):
        return f"model-weights: {err}"[:1000]
    if isinstance(err, ClassMismatch):
        return f"classes: {err}"[:1000]
    if isinstance(err, SiteDataError):
        unusable, rows = getattr(err, "unusable_rows", None), getattr(err, "rows", None)
        counts = (f" ({unusable} unusable rows of {rows})"
                  if isinstance(unusable, int) and isinstance(rows, int) else "")
        return (f"site-data: the hospital's data failed its check{counts}; details in the "
                f"hospital's log ('medfed hospital check')")
    if isinstance(err, ManifestError):
        return "site-data: the hospital's manifest is unusable; details in the hospital's log"
    if isinstance(err, LedgerIntegrityError):
        return ("privacy-ledger: the hospital's privacy ledger failed its integrity check; no "
                "private round until its operator acts (details in the hospital's log)")
    if isinstance(err, NonFiniteError):  # tensor names and counts only, never data
        return f"non-finite: {err}"[:1000]
    if isinstance(err, FloatingPointError):
        return "training: the training loss is not finite (lower the learning rate)"
    if isinstance(err, OSError):
        return f"local-io: {type(err).__name__} reading the hospital's files; details in its log"
    return f"local-failure: {type(err).__name__}; details in the hospital's log"


def audited_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The ClientApp's egress point: every reply, error or not, is audited before it leaves.

    A handler that raises is answered with :func:`failure_reply` (the daemon stays up), so
    there is no reply that escapes the log.
    """
    try:
        reply = call_next(msg, context)
    except Exception as err:  # noqa: BLE001 (answered and audited, never lost)
        reply = failure_reply(msg, err)
    audit_reply(msg, reply, context)
    return reply


class AuditedClientApp(ClientApp):
    """A ClientApp that answers and audits every message, also one its dispatch refuses.

    Flower's ``ClientApp.__call__`` raises, before any mod runs, for a message type that no
    handler is registered for (or a malformed one); the mods, :func:`audited_mod` included,
    never see it. Here that failure is answered like any other (:func:`failure_reply`,
    category only) and its line written.
    """

    def __call__(self, message: Message, context: Context) -> Message:
        try:
            return super().__call__(message, context)
        except Exception as err:  # noqa: BLE001 (answered and audited, never lost)
            reply = failure_reply(message, err)
            audit_reply(message, reply, context)
            return reply


def is_audited(reply: Message) -> bool:
    """Whether ``reply`` went through :func:`audit_reply` (its line is written, if the node
    keeps a log)."""
    return bool(getattr(reply, _AUDITED, False))


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


GENESIS = hash_chain.GENESIS
"""The ``prev_sha256`` of a log's first line."""


def line_sha256(line: bytes) -> str:
    """sha256 (hex) of one log line's bytes, without its newline."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def head_path(path: Path) -> Path:
    """The head file beside the log: ``{"lines": n, "sha256": last line's hash}``."""
    return Path(path).with_name(Path(path).name + ".head")


def append_audit_line(path: Path, reply: Message, server_round: int | None) -> dict[str, Any]:
    """Append one chained line describing ``reply`` to the log at ``path``; return the entry.

    The log is locked (``flock``) while the last line is read and the new one written, so
    processes of one daemon cannot interleave lines.
    """
    entry = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
             "round": server_round} | describe_message(reply)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+b") as log:
        fcntl.flock(log.fileno(), fcntl.LOCK_EX)
        last, count = _last_line(log)
        entry["prev_sha256"] = line_sha256(last) if last else GENESIS
        entry["sha256"] = _entry_sha256(entry)
        line = json.dumps(entry, sort_keys=False, allow_nan=True).encode()
        log.write(line + b"\n")
        log.flush()
        os.fsync(log.fileno())
        _write_head(head_path(path), count + 1, line_sha256(line))
    return entry


def _entry_sha256(entry: dict[str, Any]) -> str:
    """sha256 of an entry's JSON without its own ``sha256`` field (key order as written)."""
    body = {k: v for k, v in entry.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=False, allow_nan=True).encode()).hexdigest()


def _last_line(log: Any) -> tuple[bytes, int]:
    """The log's last line and its number of lines (the log is small enough to scan)."""
    log.seek(0)
    last, count = b"", 0
    for line in log:
        if line.strip():
            last, count = line, count + 1
    return last, count


def _write_head(path: Path, lines: int, digest: str) -> None:
    hash_chain.write_anchor(path, {"lines": lines, "sha256": digest})


@dataclass(frozen=True)
class AuditCheck:
    """The outcome of :func:`verify_audit_log`.

    Attributes:
        lines: lines read.
        broken_line: the first line (1-based) where the chain breaks; 0 when intact.
        reason: what is wrong there, in words ("" when intact).
    """

    lines: int
    broken_line: int = 0
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.broken_line == 0


def verify_audit_log(path: Path) -> AuditCheck:
    """Check an audit log's hash chain and its head file; name the first broken line.

    Raises:
        FileNotFoundError: there is no log at ``path``.
    """
    path = Path(path)
    unreadable = 0

    def links(log: Any) -> Iterator[hash_chain.Link]:
        nonlocal unreadable
        for number, line in enumerate(log, start=1):
            try:
                entry = json.loads(line)
                stored, own = entry["prev_sha256"], entry["sha256"]
            except (ValueError, KeyError, TypeError):
                unreadable = number
                return
            yield hash_chain.Link(prev=stored, digest=line_sha256(line),
                                  intact=own == _entry_sha256(entry))

    with open(path, "rb") as log:
        chain = hash_chain.walk(links(log))
    if unreadable:
        return AuditCheck(unreadable, unreadable, "not a chained audit entry (edited or "
                          "written by something else)")
    if chain.broken:
        return AuditCheck(chain.records, chain.broken, "was edited (its content does not match "
                          "its own hash)" if chain.edited else "does not chain to the line "
                          "before it: lines before it were removed, or the line before it was "
                          "rewritten with a new hash")
    return _check_head(chain, head_path(path))


def _check_head(chain: hash_chain.ChainWalk, head: Path) -> AuditCheck:
    """Compare an intact chain of ``chain.records`` lines with the head file ``head``.

    A missing head file fails: deleting it is how lines cut off the end would be hidden (the
    daemon writes it with the log's first line, so only a crash inside that first write, or
    someone, leaves a log without one).
    """
    number = chain.records
    if not head.exists():
        if number == 0:
            return AuditCheck(0)
        return AuditCheck(number, number, f"the head file {head} is missing: it was deleted, "
                          f"so lines cut off the end cannot be ruled out (compare the head hash "
                          f"sent off this machine, e.g. to syslog, with line {number}'s)")
    try:
        values = json.loads(head.read_text())
        lines, digest = int(values["lines"]), str(values["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return AuditCheck(number, number + 1, f"head file {head} is unreadable")
    mismatch = hash_chain.anchor_mismatch(chain, lines, digest)
    if mismatch == "cut":
        return AuditCheck(number, number + 1,
                          f"the head file {head} records {lines} lines: lines were cut "
                          f"off the end")
    if mismatch:
        return AuditCheck(number, lines, f"differs from the hash the head file {head} "
                          f"recorded when it was written: the line was edited")
    return AuditCheck(number)


def audit_reply(request: Message, reply: Message, context: Context) -> None:
    """Log ``reply`` (the answer to ``request``) if the node config names an ``audit-log``."""
    path = context.node_config.get(AUDIT_LOG_KEY)
    if path:
        append_audit_line(Path(str(path)), reply, _request_round(request))
    setattr(reply, _AUDITED, True)


def _request_round(request: Message) -> int | None:
    """The round a request names: its training config's ``server-round`` or, for the
    secure-aggregation stages that carry no training config, the stage record's ``round``."""
    if not request.has_content():
        return None
    records = request.content.config_records
    for name, key in (("config", "server-round"), (SECAGG_RECORD, "round")):
        if name in records and records[name].get(key) is not None:
            try:
                return int(records[name][key])
            except (TypeError, ValueError):  # a malformed request is logged, not refused here
                return None
    return None


def read_audit_log(path: Path) -> list[dict[str, Any]]:
    """Every entry of an audit log, in order."""
    with open(path, encoding="utf-8") as log:
        return [json.loads(line) for line in log if line.strip()]
