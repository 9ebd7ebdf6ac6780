"""The coordinator's ServerApp for Flower's simulation engine (``run_simulation`` in this
process): a thin main around :func:`server.rounds.run_study_rounds` that keeps the outcome.

:class:`ServerRun` (what one run needs) is shared with the deployment engine's ServerApp
(``server.deployment_app``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from models.data import ImageSet
from server.records import RunRecords
from server.rounds import FederationOutcome, ReplyCallback, RoundCallback, run_study_rounds
from server.study import Study


@dataclass
class ServerRun:
    """Everything one run of the ServerApp needs, and where its outcome lands.

    ``test_set``: a test set the coordinator holds (simulations only; a deployed coordinator
    holds no data and judges the adapter by the hospitals' combined evaluation).
    """

    study: Study
    records: RunRecords
    test_set: ImageSet | None = None
    on_round: RoundCallback | None = None
    on_reply: ReplyCallback | None = None
    wrap_grid: Callable[[Grid], Grid] | None = None
    """Simulation only: wraps Flower's grid before the round loop sees it (simulated
    stragglers hold replies back there)."""
    outcome: FederationOutcome | None = field(default=None, init=False)
    error: BaseException | None = field(default=None, init=False)


def build_server_app(run: ServerRun) -> ServerApp:
    """A ServerApp that runs ``run`` and stores its outcome (or its error) on it.

    Flower logs a failed ServerApp and still returns normally, so the caller reads
    ``run.outcome`` / ``run.error`` instead of trusting that the call returned.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if run.wrap_grid is not None:
            grid = run.wrap_grid(grid)
        try:
            run.outcome = run_study_rounds(grid, run.study, run.records, run.test_set,
                                           run.on_round, run.on_reply)
        except BaseException as err:
            run.error = err
            raise

    return app
