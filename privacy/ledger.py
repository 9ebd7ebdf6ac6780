"""The hospital's privacy ledger: every round that touched a dataset, in SQLite on its own disk.

One row per mechanism per round: which run and round, the mechanism (``dpsgd`` or
``client-gaussian``), its parameters as an accounting event, and the epsilon composed over *all*
rows of that dataset once the round is in. A round's rows go in as one transaction, so a crash
mid-round leaves the ledger as it was before the round; SQLite's rollback journal (synchronous
FULL) makes a committed round survive a crash.

When to write: after local training and before the reply leaves the hospital. Privacy is spent
when the update is released; a round recorded but never sent errs on the safe side, and a round
that crashes during training released nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from privacy.accounting import Event, epsilon

SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    fingerprint TEXT NOT NULL,
    run_id TEXT NOT NULL,
    server_round INTEGER NOT NULL,
    mechanism TEXT NOT NULL,
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps INTEGER NOT NULL CHECK (steps > 0),
    clip_norm REAL NOT NULL,
    accountant TEXT NOT NULL,
    delta REAL NOT NULL,
    budget REAL NOT NULL,
    epsilon_total REAL NOT NULL,
    recorded_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rounds_by_dataset ON rounds (fingerprint, id);
"""


class BudgetExceeded(RuntimeError):
    """A round would take a dataset's composed epsilon past the site's budget."""


@dataclass(frozen=True)
class Charge:
    """One mechanism of one round, as the ledger charges it.

    Attributes:
        mechanism: ``dpsgd`` (per-example, opacus) or ``client-gaussian`` (update clip + noise).
        noise_multiplier: noise std over the clipping norm (> 0).
        sample_rate: Poisson sampling rate of the privacy unit, in (0, 1].
        steps: releases of the mechanism in the round.
        clip_norm: the L2 clipping bound (for the record; epsilon does not depend on it).
    """

    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float

    @property
    def event(self) -> Event:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class LedgerRow:
    """One recorded row (see the module docstring)."""

    fingerprint: str
    run_id: str
    server_round: int
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    accountant: str
    delta: float
    budget: float
    epsilon_total: float
    recorded_at: str


class Ledger:
    """A SQLite privacy ledger at ``path`` (created on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        with closing(sqlite3.connect(self.path, timeout=30.0, isolation_level=None)) as conn:
            conn.execute("PRAGMA synchronous = FULL")
            yield conn

    def events(self, fingerprint: str) -> list[Event]:
        """Every accounting event recorded for a dataset, oldest first."""
        with self._connect() as conn:
            return _events(conn, fingerprint)

    def rows(self, fingerprint: str | None = None) -> list[LedgerRow]:
        """Recorded rows (of one dataset, or all), oldest first."""
        query = f"SELECT {', '.join(LedgerRow.__dataclass_fields__)} FROM rounds"
        args: tuple = ()
        if fingerprint is not None:
            query += " WHERE fingerprint = ?"
            args = (fingerprint,)
        with self._connect() as conn:
            return [LedgerRow(*r) for r in conn.execute(query + " ORDER BY id", args)]

    def projected_epsilon(
        self, fingerprint: str, charges: list[Charge], delta: float, accountant: str
    ) -> float:
        """The dataset's composed epsilon if ``charges`` were added (a dry run; writes nothing)."""
        return epsilon(self.events(fingerprint) + [c.event for c in charges], delta, accountant)

    def record_round(
        self,
        fingerprint: str,
        run_id: str,
        server_round: int,
        charges: list[Charge],
        delta: float,
        accountant: str,
        budget: float,
    ) -> float:
        """Record one round's charges atomically; returns the dataset's new composed epsilon.

        The budget is checked again inside the write transaction (``BEGIN IMMEDIATE`` locks out
        other writers), so two runs on the same dataset cannot both squeeze under it.

        Raises:
            BudgetExceeded: the round would take the composed epsilon past ``budget``; nothing
                is recorded and the round's update must not be released.
        """
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                events = _events(conn, fingerprint)
                for charge in charges:
                    events.append(charge.event)
                    total = epsilon(events, delta, accountant)
                    if total > budget:
                        raise BudgetExceeded(
                            f"dataset {fingerprint[:12]}: this round would bring epsilon to "
                            f"{total:.3f}, past the site budget {budget:g} (delta {delta:g})"
                        )
                    self._insert(conn, (
                        fingerprint, str(run_id), int(server_round), charge.mechanism,
                        charge.noise_multiplier, charge.sample_rate, charge.steps,
                        charge.clip_norm, accountant, delta, budget, total, now,
                    ))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return total if charges else epsilon(events, delta, accountant)

    @staticmethod
    def _insert(conn: sqlite3.Connection, values: tuple) -> None:
        conn.execute(
            f"INSERT INTO rounds ({', '.join(list(LedgerRow.__dataclass_fields__))}) "
            f"VALUES ({', '.join('?' * len(values))})",
            values,
        )


def _events(conn: sqlite3.Connection, fingerprint: str) -> list[Event]:
    cursor = conn.execute(
        "SELECT noise_multiplier, sample_rate, steps FROM rounds WHERE fingerprint = ? "
        "ORDER BY id", (fingerprint,))
    return [(float(z), float(q), int(n)) for z, q, n in cursor]


@dataclass(frozen=True)
class RunSpend:
    """One run's spend on one dataset, as the ledger table shows it.

    Attributes:
        fingerprint: the dataset.
        run_id: the run.
        rounds: rounds of the run recorded on the dataset.
        mechanisms: the mechanisms the run used, comma-separated.
        epsilon_run: the run's own epsilon (its events composed alone).
        epsilon_total: the dataset's composed epsilon after the run's last round (all runs).
        budget: the site budget in force at that round (``inf``: no policy).
        delta: the delta of both epsilons.
    """

    fingerprint: str
    run_id: str
    rounds: int
    mechanisms: str
    epsilon_run: float
    epsilon_total: float
    budget: float
    delta: float

    @property
    def remaining(self) -> float:
        """Budget left on the dataset after the run's last round."""
        return self.budget - self.epsilon_total


def run_spends(ledger: Ledger) -> list[RunSpend]:
    """Per dataset and run, in the order runs first touched the dataset."""
    groups: dict[tuple[str, str], list[LedgerRow]] = {}
    for row in ledger.rows():
        groups.setdefault((row.fingerprint, row.run_id), []).append(row)
    spends = []
    for (fingerprint, run_id), rows in groups.items():
        last = rows[-1]
        spends.append(RunSpend(
            fingerprint=fingerprint, run_id=run_id,
            rounds=len({r.server_round for r in rows}),
            mechanisms=", ".join(sorted({r.mechanism for r in rows})),
            epsilon_run=epsilon([(r.noise_multiplier, r.sample_rate, r.steps) for r in rows],
                                last.delta, last.accountant),
            epsilon_total=last.epsilon_total, budget=last.budget, delta=last.delta,
        ))
    return spends
