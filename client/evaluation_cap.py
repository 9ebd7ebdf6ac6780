"""How many evaluations a hospital answers, and how coarse their metrics are.

Each evaluate message is a query on the hospital's validation set with an adapter the
coordinator chose: enough crafted ones recover every validation label (a threshold scan on
one feature moves accuracy by 1/N as it passes each example). The run policy therefore caps
them (``max_evaluations_per_run``, ``max_evaluations_per_day``), counted in a small SQLite file
in the site folder (node config ``evaluation-count``; restarts do not reset it), and under a
privacy policy only coarse metrics leave: rounded to ``evaluation_decimals``, on a validation
set of at least ``min_evaluation_examples``, never per-example values.
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
from pathlib import Path

from flwr.app import Context, Message

from client.run_policy import RUN_POLICY_KEY, RunPolicy
from core.errors import MedfedError

EVALUATION_COUNT_KEY = "evaluation-count"
"""Node-config key with the evaluation counter's path (SQLite)."""
DEFAULT_COUNT_FILE = "evaluation-count.sqlite"
"""Next to the run policy when the node config names no counter."""
DAY_S = 24 * 3600.0


class EvaluationRefusal(MedfedError, ValueError):
    """An evaluation the hospital's rules do not allow (the reason names the rule)."""


def counter_path(context: Context) -> Path:
    """The node's evaluation counter: ``evaluation-count``, else beside the run policy."""
    if path := context.node_config.get(EVALUATION_COUNT_KEY):
        return Path(str(path))
    return Path(str(context.node_config[RUN_POLICY_KEY])).with_name(DEFAULT_COUNT_FILE)


def _connect(path: Path) -> sqlite3.Connection:
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # 0600 from the start
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    db.execute("CREATE TABLE IF NOT EXISTS evaluations "
               "(run_id TEXT NOT NULL, node_id TEXT NOT NULL, at REAL NOT NULL)")
    return db


def admit(path: Path, run_id: int, node_id: int, policy: RunPolicy,
          now: float | None = None) -> str:
    """Record one evaluation of run ``run_id`` if the caps allow it; else the reason (nothing
    recorded). Atomic across the hospital's concurrent task processes."""
    now = time.time() if now is None else now
    db = _connect(Path(path))
    try:
        db.execute("BEGIN IMMEDIATE")  # one writer at a time: no two tasks take the last slot
        in_run = db.execute("SELECT COUNT(*) FROM evaluations WHERE run_id = ? AND node_id = ?",
                            (str(run_id), str(node_id))).fetchone()[0]
        in_day = db.execute("SELECT COUNT(*) FROM evaluations WHERE at > ?",
                            (now - DAY_S,)).fetchone()[0]
        reason = ""
        if in_run >= policy.max_evaluations_per_run:
            reason = (f"run policy 'max_evaluations_per_run': run {run_id} has had its "
                      f"{policy.max_evaluations_per_run} evaluations")
        elif in_day >= policy.max_evaluations_per_day:
            reason = (f"run policy 'max_evaluations_per_day': {in_day} evaluations in the "
                      f"last 24 h (at most {policy.max_evaluations_per_day})")
        if reason:
            db.execute("ROLLBACK")
            return reason
        # Flower's ids are unsigned 64-bit: beyond SQLite's INTEGER, so kept as text.
        db.execute("INSERT INTO evaluations VALUES (?, ?, ?)", (str(run_id), str(node_id), now))
        db.execute("COMMIT")
        return ""
    finally:
        db.close()


def admit_evaluation(msg: Message, context: Context, policy: RunPolicy) -> str:
    """:func:`admit` for an evaluate message (counted before any work is done)."""
    return admit(counter_path(context), msg.metadata.run_id, context.node_id, policy)


def released_metrics(scores: dict[str, float], num_examples: int,
                     policy: RunPolicy) -> dict[str, float]:
    """The evaluation metrics a hospital under a privacy policy may release: each rounded to
    ``policy.evaluation_decimals``.

    Raises:
        EvaluationRefusal: the validation set is smaller than ``min_evaluation_examples``.
    """
    if num_examples < policy.min_evaluation_examples:
        raise EvaluationRefusal(
            f"run policy 'min_evaluation_examples': the validation set has {num_examples} "
            f"examples, fewer than {policy.min_evaluation_examples}")
    return {name: value if math.isnan(value) else round(float(value),
                                                        policy.evaluation_decimals)
            for name, value in scores.items()}
