"""The hospital's privacy ledger: every round that touched a dataset, in SQLite on its own disk.

One row per mechanism per round: which run and round, the mechanism (``dpsgd`` or
``client-gaussian``), the unit it protects, its parameters as an accounting event, and the
example-level epsilon composed over *all* rows of that dataset once the round is in. A round's
rows go in as one transaction, so a crash mid-round leaves the ledger as it was before the round;
SQLite's rollback journal (synchronous FULL) makes a committed round survive a crash.

Units. ``dpsgd`` rows protect one training example (per-example clipping at ``C``).
``client-gaussian`` rows protect the hospital's whole update (clipped to ``C``, noise ``z C`` on
the sum): one example can change that clipped update by up to ``2 C`` (from one point of the
ball of radius ``C`` to another), so at the example level the same release is a Gaussian
mechanism with noise multiplier ``z / 2``. The budget is example-level: the ledger composes
every row in example-level terms (:attr:`Charge.example_event`), and so does every epsilon it
reports.

Keyed by the dataset id the hospital declares (``dataset_id`` in ``hospital.toml``), never by a
hash of the data: a hash changes with the image size or one more patient, and each change would
open a fresh budget.

Tamper evidence. Each row carries the sha256 of the previous row and its own (a hash chain), and
an anchor file beside the ledger (``<ledger>.anchor``) records how many rows the chain held and
its last hash. Opening a ledger checks both: a deleted ledger whose anchor remains, an edited or
removed row, or a missing anchor raises :class:`LedgerIntegrityError` naming the file, and the
hospital trains no DP round until an operator restores the ledger. Ledger and anchor are created
0600. (Someone with write access to the hospital's disk who deletes both files resets the
budget; that is the hospital's own staff, outside what software on the same disk can stop.)

When to write: after local training and before the reply leaves the hospital. Privacy is spent
when the update is released; a round recorded but never sent errs on the safe side, and a round
that crashes during training released nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from core.errors import MedfedError
from privacy import hash_chain
from privacy.accounting import Event, epsilon

EXAMPLE = "example"
"""Unit of a charge that protects one training example (DP-SGD)."""
HOSPITAL = "hospital"
"""Unit of a charge that protects the hospital's whole update (client-level DP)."""
UNITS = (EXAMPLE, HOSPITAL)
GENESIS = hash_chain.GENESIS
"""The "previous hash" of a ledger's first row."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    server_round INTEGER NOT NULL,
    mechanism TEXT NOT NULL,
    unit TEXT NOT NULL CHECK (unit IN ('example', 'hospital')),
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps INTEGER NOT NULL CHECK (steps > 0),
    clip_norm REAL NOT NULL,
    accountant TEXT NOT NULL,
    delta REAL NOT NULL,
    budget REAL NOT NULL,
    epsilon_total REAL NOT NULL,
    recorded_at TEXT NOT NULL,
    prev_sha256 TEXT NOT NULL,
    row_sha256 TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rounds_by_dataset ON rounds (dataset_id, id);
"""


class BudgetExceeded(MedfedError, RuntimeError):
    """A round would take a dataset's composed epsilon past the site's budget."""


class LedgerIntegrityError(MedfedError, RuntimeError):
    """The ledger was deleted, edited or lost its anchor; the message names the file."""


@dataclass(frozen=True)
class Charge:
    """One mechanism of one round, as the ledger charges it.

    Attributes:
        mechanism: ``dpsgd`` (per-example, opacus) or ``client-gaussian`` (update clip + noise).
        noise_multiplier: noise std over the clipping norm (> 0), in terms of ``unit``.
        sample_rate: Poisson sampling rate of the privacy unit, in (0, 1].
        steps: releases of the mechanism in the round.
        clip_norm: the L2 clipping bound (for the record; epsilon does not depend on it).
        unit: what the noise multiplier protects: ``example`` (sensitivity ``C`` per
            example) or ``hospital`` (sensitivity ``C`` for the whole update).
    """

    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    unit: str = EXAMPLE

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"charge unit '{self.unit}' is not one of {UNITS}")
        # Finite or refused: a NaN noise multiplier would be charged as nothing, an infinite
        # one would make the accountant spin.
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"charge noise multiplier {self.noise_multiplier} must be a "
                             "finite number, at least 0")
        if not (math.isfinite(self.sample_rate) and 0 < self.sample_rate <= 1):
            raise ValueError(f"charge sample rate {self.sample_rate} must be in (0, 1]")
        if not math.isfinite(self.clip_norm) or self.steps < 0:
            raise ValueError("charge clip norm must be finite and steps at least 0")

    @property
    def event(self) -> Event:
        """The accounting event in the charge's own unit."""
        return (self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def example_event(self) -> Event:
        """The accounting event for one example: a hospital-level release (sensitivity ``C``)
        has sensitivity ``2 C`` for one example, i.e. half the noise multiplier."""
        return example_event(self.unit, *self.event)


def example_event(unit: str, noise_multiplier: float, sample_rate: float, steps: int) -> Event:
    """``(z, q, n)`` of a mechanism of ``unit`` in example-level terms (see the module
    docstring: a hospital-level ``z`` is ``z / 2`` for one example)."""
    if unit == HOSPITAL:
        return (noise_multiplier / 2.0, sample_rate, steps)
    return (noise_multiplier, sample_rate, steps)


@dataclass(frozen=True)
class LedgerRow:
    """One recorded row (see the module docstring)."""

    dataset_id: str
    run_id: str
    server_round: int
    mechanism: str
    unit: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    accountant: str
    delta: float
    budget: float
    epsilon_total: float
    recorded_at: str

    @property
    def example_event(self) -> Event:
        return example_event(self.unit, self.noise_multiplier, self.sample_rate, self.steps)


FIELDS = list(LedgerRow.__dataclass_fields__)


def row_sha256(prev: str, values: tuple) -> str:
    """sha256 (hex) of a row: the previous row's hash and the row's values, as JSON."""
    return hashlib.sha256((prev + json.dumps(list(values))).encode()).hexdigest()


class Ledger:
    """A SQLite privacy ledger at ``path`` and its anchor ``path + '.anchor'`` (both created
    0600 on first use; both checked at every open, see the module docstring).

    Raises:
        LedgerIntegrityError: the ledger was deleted (its anchor remains), a row was edited or
            removed, the anchor is missing, or the file predates the hash chain.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.anchor = self.path.with_name(self.path.name + ".anchor")
        if not self.path.exists():
            if self.anchor.exists():
                rows = _read_anchor(self.anchor)[0]
                raise LedgerIntegrityError(
                    f"privacy ledger {self.path} is missing, but its anchor {self.anchor} "
                    f"records {rows} rows: the ledger was deleted or moved. Restore it from a "
                    f"backup; this hospital trains no private round until then. (Removing the "
                    f"anchor too would reset every budget: an operator's decision.)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            with self._connect() as conn:
                conn.executescript(SCHEMA)
            _write_anchor(self.anchor, 0, GENESIS)
            return
        if not self.anchor.exists():
            raise LedgerIntegrityError(
                f"privacy ledger {self.path} has no anchor {self.anchor}: it was not created "
                f"by this medfed or its anchor was deleted. An operator must check it; move it "
                f"aside (keep it: it records spent budget) to start a new ledger.")
        with self._connect() as conn:
            self._verify(conn)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        with closing(sqlite3.connect(self.path, timeout=30.0, isolation_level=None)) as conn:
            conn.execute("PRAGMA synchronous = FULL")
            yield conn

    def _verify(self, conn: sqlite3.Connection) -> str:
        """Check the hash chain and the anchor; returns the last row's hash."""
        columns = {r[1] for r in conn.execute("PRAGMA table_info(rounds)")}
        if "row_sha256" not in columns:
            raise LedgerIntegrityError(
                f"privacy ledger {self.path} predates the hash chain (or is not a ledger); move "
                f"it aside (keep it: it records spent budget) to start a new one")
        query = f"SELECT id, {', '.join(FIELDS)}, prev_sha256, row_sha256 FROM rounds ORDER BY id"
        rows = conn.execute(query).fetchall()
        chain = hash_chain.walk(
            hash_chain.Link(prev=r[-2], digest=r[-1], intact=row_sha256(r[-2], r[1:-2]) == r[-1])
            for r in rows)
        if chain.broken:
            raise LedgerIntegrityError(
                f"privacy ledger {self.path}: row {rows[chain.broken - 1][0]} was edited, or a "
                f"row before it was removed (its hash chain breaks there). Restore the ledger "
                f"from a backup; this hospital trains no private round until then.")
        count, prev = chain.records, chain.hashes[-1]
        anchored, head = _read_anchor(self.anchor)
        if hash_chain.anchor_mismatch(chain, anchored, head):
            raise LedgerIntegrityError(
                f"privacy ledger {self.path} holds {count} rows, but its anchor {self.anchor} "
                f"records {anchored}: rows were removed. Restore the ledger from a backup; this "
                f"hospital trains no private round until then.")
        if count > anchored:  # a crash between commit and anchor update: catch up
            _write_anchor(self.anchor, count, prev)
        return prev

    def events(self, dataset_id: str) -> list[Event]:
        """Every accounting event recorded for a dataset, in example-level terms, oldest
        first."""
        with self._connect() as conn:
            return _events(conn, dataset_id)

    def rows(self, dataset_id: str | None = None) -> list[LedgerRow]:
        """Recorded rows (of one dataset, or all), oldest first."""
        query = f"SELECT {', '.join(FIELDS)} FROM rounds"
        args: tuple = ()
        if dataset_id is not None:
            query += " WHERE dataset_id = ?"
            args = (dataset_id,)
        with self._connect() as conn:
            return [LedgerRow(*r) for r in conn.execute(query + " ORDER BY id", args)]

    def charged(self, dataset_id: str, run_id: str, server_round: int) -> bool:
        """Whether round ``server_round`` of run ``run_id`` was charged on the dataset."""
        with self._connect() as conn:
            row = conn.execute("SELECT 1 FROM rounds WHERE dataset_id = ? AND run_id = ? AND "
                               "server_round = ? LIMIT 1",
                               (str(dataset_id), str(run_id), int(server_round))).fetchone()
        return row is not None

    def run_epsilon(self, dataset_id: str, run_id: str) -> tuple[float, float] | None:
        """``(epsilon, delta)`` of one run's rows on a dataset alone (example level, with the
        accountant and delta they were recorded with); ``None`` if the run has no rows."""
        rows = [r for r in self.rows(dataset_id) if r.run_id == str(run_id)]
        if not rows:
            return None
        last = rows[-1]
        return epsilon([r.example_event for r in rows], last.delta, last.accountant), last.delta

    def projected_epsilon(
        self, dataset_id: str, charges: list[Charge], delta: float, accountant: str
    ) -> float:
        """The dataset's composed example-level epsilon if ``charges`` were added (a dry run;
        writes nothing)."""
        return epsilon(self.events(dataset_id) + [c.example_event for c in charges], delta,
                       accountant)

    def record_round(
        self,
        dataset_id: str,
        run_id: str,
        server_round: int,
        charges: list[Charge],
        delta: float,
        accountant: str,
        budget: float,
    ) -> float:
        """Record one round's charges atomically; returns the dataset's new composed epsilon.

        The budget is checked again inside the write transaction (``BEGIN IMMEDIATE`` locks out
        other writers), so two runs on the same dataset cannot both squeeze under it; the hash
        chain is checked there too.

        Raises:
            BudgetExceeded: the round would take the composed epsilon past ``budget``; nothing
                is recorded and the round's update must not be released.
            LedgerIntegrityError: the ledger was tampered with since it was opened.
        """
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                prev = self._verify(conn)
                events = _events(conn, dataset_id)
                count = conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
                for charge in charges:
                    events.append(charge.example_event)
                    total = epsilon(events, delta, accountant)
                    if total > budget:
                        raise BudgetExceeded(
                            f"this round would bring epsilon to {total:.3f}, past the site "
                            f"budget {budget:g} (delta {delta:g})")
                    values = (
                        str(dataset_id), str(run_id), int(server_round), charge.mechanism,
                        charge.unit, float(charge.noise_multiplier), float(charge.sample_rate),
                        int(charge.steps), float(charge.clip_norm), accountant, float(delta),
                        float(budget), float(total), now,
                    )
                    digest = row_sha256(prev, values)
                    self._insert(conn, (*values, prev, digest))
                    prev, count = digest, count + 1
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        _write_anchor(self.anchor, count, prev)
        return total if charges else epsilon(events, delta, accountant)

    @staticmethod
    def _insert(conn: sqlite3.Connection, values: tuple) -> None:
        """Insert one row: the ledger's fields, then the previous and own hash."""
        _insert_row(conn, values)


def _insert_row(conn: sqlite3.Connection, values: tuple) -> None:
    conn.execute(f"INSERT INTO rounds ({', '.join(FIELDS)}, prev_sha256, row_sha256) "
                 f"VALUES ({', '.join('?' * len(values))})", values)


def _events(conn: sqlite3.Connection, dataset_id: str) -> list[Event]:
    cursor = conn.execute(
        "SELECT unit, noise_multiplier, sample_rate, steps FROM rounds WHERE dataset_id = ? "
        "ORDER BY id", (dataset_id,))
    return [example_event(u, float(z), float(q), int(n)) for u, z, q, n in cursor]


def _read_anchor(path: Path) -> tuple[int, str]:
    try:
        values = json.loads(path.read_text())
        return int(values["rows"]), str(values["head"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LedgerIntegrityError(f"ledger anchor {path} is unreadable ({err}); an operator "
                                   f"must check the ledger beside it") from err


def _write_anchor(path: Path, rows: int, head: str) -> None:
    hash_chain.write_anchor(path, {"rows": rows, "head": head})


@dataclass(frozen=True)
class RunSpend:
    """One run's spend on one dataset, as the ledger table shows it.

    Attributes:
        dataset_id: the dataset, as the hospital declared it.
        run_id: the run.
        rounds: distinct rounds of the run recorded on the dataset.
        charges: times a round of the run was charged (more than ``rounds``: a round was
            charged twice, e.g. trained again after a coordinator restart).
        mechanisms: the mechanisms the run used, comma-separated.
        epsilon_run: the run's own example-level epsilon (its events composed alone).
        epsilon_total: the dataset's composed epsilon after the run's last round (all runs).
        budget: the site budget in force at that round (``inf``: no policy).
        delta: the delta of both epsilons.
    """

    dataset_id: str
    run_id: str
    rounds: int
    mechanisms: str
    epsilon_run: float
    epsilon_total: float
    budget: float
    delta: float
    charges: int = 0

    @property
    def fingerprint(self) -> str:
        """The dataset id (the name older callers use)."""
        return self.dataset_id

    @property
    def remaining(self) -> float:
        """Budget left on the dataset after the run's last round."""
        return self.budget - self.epsilon_total


def run_spends(ledger: Ledger) -> list[RunSpend]:
    """Per dataset and run, in the order runs first touched the dataset."""
    groups: dict[tuple[str, str], list[LedgerRow]] = {}
    for row in ledger.rows():
        groups.setdefault((row.dataset_id, row.run_id), []).append(row)
    spends = []
    for (dataset_id, run_id), rows in groups.items():
        last = rows[-1]
        spends.append(RunSpend(
            dataset_id=dataset_id, run_id=run_id,
            rounds=len({r.server_round for r in rows}),
            mechanisms=", ".join(sorted({r.mechanism for r in rows})),
            epsilon_run=epsilon([r.example_event for r in rows], last.delta, last.accountant),
            epsilon_total=last.epsilon_total, budget=last.budget, delta=last.delta,
            charges=round_charges(rows),
        ))
    return spends


def round_charges(rows: list[LedgerRow]) -> int:
    """How many times rounds were charged: per round, the most rows one mechanism has there
    (a round charged once has one row per mechanism)."""
    per_round: dict[int, dict[str, int]] = {}
    for row in rows:
        counts = per_round.setdefault(row.server_round, {})
        counts[row.mechanism] = counts.get(row.mechanism, 0) + 1
    return sum(max(counts.values()) for counts in per_round.values())
