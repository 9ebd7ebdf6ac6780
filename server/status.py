"""``medfed coordinator status``: hospitals connected (from the SuperLink's node registry, named by
the enrolment list) and each run's last completed round and last error (from its run dir)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from server.checkpoint import CHECKPOINT_FILE
from server.consortium import load_coordinator_config, load_enrolments


@dataclass(frozen=True)
class HospitalStatus:
    """One enrolled hospital as the SuperLink sees it (status ``online``/``offline``/
    ``registered``, or ``not registered`` when the registry does not list it)."""

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
    """Join the enrolment list with ``flwr supernode ls --format json`` output."""
    try:
        nodes = {n["node-id"]: n for n in json.loads(registry_json).get("nodes", [])}
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"cannot read the SuperLink's node list ({err}): is it running? "
                         f"Start it with 'medfed coordinator start'") from err
    out = []
    for e in load_enrolments(folder):
        node = nodes.get(e.node_id) if e.node_id else None
        out.append(HospitalStatus(
            name=e.name, node_id=e.node_id or "-",
            status=node["status"] if node else "not registered",
            online_since=node.get("online-at", "") if node else "",
            revoked=not e.active))
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
