"""The run directory: what a run did, written so that it can be read and reproduced.

``config.toml`` (resolved settings), ``metrics.csv`` (one row per round and hospital - a
deployed hospital by the name it was enrolled under - plus a
``global`` row per round: the hospitals' validation metrics combined, weighted by examples, in
its ``val_*`` columns, and the metrics on a coordinator-held test set, when there is one, in its
``test_*`` columns), ``summary.json`` and ``adapter/`` (peft format, the published round's).
A simulation and a deployment write the same files.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tomli_w

from models.metrics import RECORDED_METRIC_NAMES
from strategies.replies import Reply

logger = logging.getLogger(__name__)

METRICS_COLUMNS = [
    "round", "hospital", "node_id", "num_examples", "train_loss", "val_examples",
    *(f"val_{name}" for name in RECORDED_METRIC_NAMES),
    *(f"test_{name}" for name in RECORDED_METRIC_NAMES),
    "upload_bytes", "site_fingerprint", "epsilon", "delta", "error", "evaluation_error",
    "val_auc_examples",
]
GLOBAL = "global"


def _clean(value: Any) -> Any:
    """JSON/TOML-safe value: NaN and infinities become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def trained(row: dict[str, Any]) -> bool:
    """Whether a hospital's row holds a training update its round could aggregate (whatever
    became of the round's evaluation: that is an outcome of its own)."""
    return row.get("num_examples") is not None and not row.get("train_error")


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


@dataclass
class RunRecords:
    """Collects a run's rows in memory and writes them to ``run_dir``."""

    run_dir: Path
    rows: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)
    # node id -> hospital id seen in an earlier reply: an error reply (a privacy refusal, say)
    # carries no metrics, and its row should still land on the hospital's line.
    hospital_of: dict[int, str] = field(default_factory=dict, repr=False)
    # node id -> the name the hospital was enrolled under (the coordinator's own enrolment
    # list; None when unknown): rows carry that name. Without it (simulations, in-process
    # runs) a hospital's rows carry the id its replies give.
    enrolled_name: Callable[[int], str | None] | None = field(default=None, repr=False)
    # node id -> (name, when) of a hospital whose enrolment was revoked (the coordinator's
    # enrolment list; None: not revoked): its failed replies are recorded as a revocation, not
    # as the SuperLink's "Node Unavailable" for the unregistered node.
    revoked: Callable[[int], tuple[str, str] | None] | None = field(default=None, repr=False)
    # What the coordinator-held test set was (``server.evaluation.describe_test_set``), for
    # summary.json; None without one.
    test_set: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _row(self, server_round: int, hospital: str) -> dict[str, Any]:
        key = (server_round, hospital)
        if key not in self.rows:
            self.rows[key] = {"round": server_round, "hospital": hospital}
        return self.rows[key]

    def add_reply(self, reply: Reply) -> None:
        """Record one hospital's train or evaluate reply (or why it was dropped)."""
        revocation = self.revoked(reply.node_id) if reply.error and self.revoked else None
        if revocation is not None:
            reply = replace(reply, error=f"revoked: hospital '{revocation[0]}' was revoked at "
                                         f"{revocation[1]}; its node was unregistered")
        named = revocation[0] if revocation is not None else self._name(reply)
        if named is not None and self.hospital_of.get(reply.node_id) != named:
            self.hospital_of[reply.node_id] = named
            self._rename(reply.node_id, named)
        hospital = self.hospital_of.get(reply.node_id, str(reply.node_id))
        row = self._row(reply.server_round, hospital)
        row["node_id"] = reply.node_id
        if reply.error:
            # Every refusal is kept: a training refusal is not overwritten by the same
            # round's evaluation refusal.
            entry = f"{reply.phase}: {reply.error}"
            kept = str(row.get("error") or "")
            row["error"] = entry if not kept else kept if entry in kept else f"{kept}; {entry}"
            if reply.phase == "evaluate":
                # Evaluation is an outcome of its own: a hospital that did not evaluate still
                # trained (``trained``), and the record says why it did not evaluate.
                row["evaluation_error"] = reply.error
            else:
                row["train_error"] = reply.error
            return
        metrics = reply.metrics
        if reply.phase == "train":
            row["num_examples"] = int(metrics["num-examples"])
            row["train_loss"] = metrics.get("train-loss")
            row["upload_bytes"] = reply.upload_bytes
            # Which data trained this update (a hash; no ids or paths leave the hospital).
            row["site_fingerprint"] = str(reply.site.get("fingerprint", ""))
            # The hospital's DP spend in this run so far (absent without DP).
            row["epsilon"] = metrics.get("dp-epsilon")
            row["delta"] = metrics.get("dp-delta")
        else:
            row["val_examples"] = int(metrics["num-examples"])
            for name in RECORDED_METRIC_NAMES:
                row[f"val_{name}"] = metrics.get(f"val-{name.replace('_', '-')}")

    def _name(self, reply: Reply) -> str | None:
        """The hospital's name: its enrolment's (from the coordinator's list, so a hospital
        cannot take another's), else the id its reply gives, else None (unknown yet)."""
        if self.enrolled_name is not None and (name := self.enrolled_name(reply.node_id)):
            return name
        if "hospital-id" in reply.metrics:
            return str(int(reply.metrics["hospital-id"]))
        return None

    def hospital_name(self, node_id: int, metrics: dict) -> str:
        """The name rows of ``node_id`` go under (a reply's ``metrics`` may give its id)."""
        return (self._name(Reply(server_round=0, phase="query", node_id=node_id,
                                 metrics=metrics)) or self.hospital_of.get(node_id)
                or str(node_id))

    def _rename(self, node_id: int, new: str) -> None:
        """Move rows filed under ``node_id`` (before its first reply named the hospital: a
        straggler's or a refusing hospital's earlier rounds) to ``new``. A hospital whose name
        happens to equal a node id keeps its rows: they carry another ``node_id``."""
        old = str(node_id)
        for key in [k for k, row in self.rows.items()
                    if k[1] == old and row.get("node_id") == node_id]:
            server_round = key[0]
            row = self.rows.pop(key)
            row["hospital"] = new
            self.rows[(server_round, new)] = {**row, **self.rows.get((server_round, new), {})}

    def not_evaluated(self) -> list[dict[str, Any]]:
        """Every hospital round without an evaluation, and why: ``round``, ``hospital``,
        ``reason`` (the evaluation refusal or failure as the hospital gave it)."""
        return [{"round": r["round"], "hospital": r["hospital"],
                 "reason": r["evaluation_error"]}
                for r in self.train_rows() if r.get("evaluation_error")]

    def add_test(self, server_round: int, metrics: dict[str, float]) -> None:
        """Record the central test metrics of the global adapter after ``server_round``."""
        row = self._row(server_round, GLOBAL)
        for name in RECORDED_METRIC_NAMES:
            row[f"test_{name}"] = metrics.get(f"test-{name.replace('_', '-')}")

    def add_round(self, server_round: int) -> dict[str, Any]:
        """The ``global`` row of ``server_round`` (made if missing)."""
        return self._row(server_round, GLOBAL)

    def validation_rows(self, server_round: int) -> list[dict[str, Any]]:
        """The hospitals' rows of ``server_round`` that hold an evaluation."""
        return [r for r in self.train_rows()
                if r["round"] == server_round and r.get("val_examples")]

    def add_combined(self, server_round: int, combined: dict[str, float]) -> None:
        """Record the hospitals' validation metrics of ``server_round`` combined (``val_*``)."""
        row = self._row(server_round, GLOBAL)
        row.update({k: v for k, v in combined.items() if k in METRICS_COLUMNS})
        for key in ("val_examples", "val_auc_examples"):
            if key in row:
                row[key] = int(row[key])

    def test_history(self) -> list[dict[str, Any]]:
        """Global rows in round order."""
        return [row for (_, h), row in sorted(self.rows.items()) if h == GLOBAL]

    def train_rows(self) -> list[dict[str, Any]]:
        """Hospitals' rows (every round), in round order."""
        return [r for (_, h), r in sorted(self.rows.items()) if h != GLOBAL]

    def privacy_summary(self) -> dict[str, Any]:
        """Each hospital's last reported epsilon (this run, so far), the largest, and the rounds
        hospitals refused on privacy grounds; empty when no hospital reported an epsilon."""
        last: dict[str, float] = {}
        delta = None
        for row in self.train_rows():
            if row.get("epsilon") is not None:
                last[row["hospital"]] = row["epsilon"]
                delta = row.get("delta")
        refusals = [{"round": r["round"], "hospital": r["hospital"], "reason": r["error"]}
                    for r in self.train_rows() if "privacy" in str(r.get("error", ""))]
        if not last and not refusals:
            return {}
        return {"epsilon_per_hospital": last, "epsilon_max": max(last.values(), default=None),
                "delta": delta, "refusals": refusals}

    def write_metrics(self) -> Path:
        path = self.run_dir / "metrics.csv"
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRICS_COLUMNS)
            writer.writeheader()
            for _, row in sorted(self.rows.items(), key=lambda kv: (kv[0][0], kv[0][1] != GLOBAL,
                                                                    kv[0][1].zfill(6))):
                writer.writerow({c: row.get(c, "") for c in METRICS_COLUMNS})
        tmp.replace(path)
        return path

    def write_config(self, config: dict[str, Any]) -> Path:
        path = self.run_dir / "config.toml"
        path.write_text(tomli_w.dumps(_drop_none(_clean(config))))
        return path

    def write_summary(self, summary: dict[str, Any]) -> Path:
        if self.test_set is not None:
            summary = summary | {"test_set": self.test_set}
        path = self.run_dir / "summary.json"
        path.write_text(json.dumps(_clean(summary), indent=2) + "\n")
        return path
