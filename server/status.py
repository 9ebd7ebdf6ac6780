"""``medfed coordinator status``: hospitals connected (from the SuperLink's node registry, named by
the enrolment list) and each run's last completed round and last error (from its run dir)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from server.checkpoint import CHECKPOINT_FILE
from server.consortium import load_coordinator_config, load_enrolments
from server.daemon import registry_nodes

UNKNOWN = "(not enrolled)"
"""The name shown for a registered node whose key is on no active enrolment."""


@dataclass(frozen=True)
class HospitalStatus:
    """One enrolled hospital as the SuperLink sees it (status ``online``/``offline``/
    ``registered``, or ``not registered`` when the registry does not list it), or a
    registered node that is on no active enrolment (name :data:`UNKNOWN`: a key registered
    behind the coordinator's back; ``medfed coordinator register`` removes it)."""

    name: str
    node_id: str
    status: str
    online_since: str
    revoked: bool


@dataclass(frozen=True)
class RunStatus:
    """A run directory: ``running or crashed`` with a checkpoint, ``finished`` with an adapter."""

    run_dir: str
    state: str
    last_round: int | None
    last_error: str


def hospital_statuses(folder: Path, registry_json: str) -> list[HospitalStatus]:
    """Join the enrolment list with ``flwr supernode ls --format json`` output; registered
    nodes no active enrolment names come last.

    Raises:
        ValueError: the output is not a node list (the SuperLink is not running).
    """
    nodes = registry_nodes(registry_json)
    out = []
    for e in load_enrolments(folder):
        node = nodes.pop(e.node_id, None) if e.node_id else None
        out.append(HospitalStatus(
            name=e.name, node_id=e.node_id or "-",
            status=node["status"] if node else "not registered",
            online_since=node.get("online-at", "") if node else "",
            revoked=not e.active))
    out += [HospitalStatus(name=UNKNOWN, node_id=node_id, status=node["status"],
                           online_since=node.get("online-at", ""), revoked=False)
            for node_id, node in nodes.items()]
    return out


def run_statuses(folder: Path) -> list[RunStatus]:
    """Every run directory under the consortium's ``run_dir``, newest last."""
    runs = Path(folder) / load_coordinator_config(folder).run_dir
    out = []
    for run_dir in sorted(p for p in runs.glob("*") if p.is_dir()):
        checkpoint = run_dir / CHECKPOINT_FILE
        last_round = None
        if checkpoint.exists():
            with safe_open(str(checkpoint), framework="pt") as handle:
                last_round = int((handle.metadata() or {}).get("server_round", 0))
            state = "running or crashed"
        elif (run_dir / "adapter").exists():
            state = "finished"
        else:
            state = "started"
        out.append(RunStatus(str(run_dir), state, last_round, _last_error(run_dir)))
    return out


def _last_error(run_dir: Path) -> str:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return ""
    with open(path, newline="") as handle:
        errors = [f"round {r['round']} hospital {r['hospital']}: {r['error']}"
                  for r in csv.DictReader(handle) if r.get("error")]
    return errors[-1] if errors else ""
