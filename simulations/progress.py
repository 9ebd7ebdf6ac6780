"""Live progress of a simulation: round, hospitals done, test AUC so far (rich)."""

from __future__ import annotations

import math

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from strategies import Reply


class RoundProgress:
    """A rich progress bar over rounds, fed by the coordinator's callbacks."""

    def __init__(self, rounds: int, hospitals: int, console: Console | None = None) -> None:
        self.rounds, self.hospitals = rounds, hospitals
        self.done_in_round, self.auc = 0, math.nan
        self.progress = Progress(
            TextColumn("[bold]federated[/]"), BarColumn(), TextColumn("{task.description}"),
            TimeElapsedColumn(), console=console, transient=False,
        )
        self.task = self.progress.add_task(self._text(1), total=rounds)

    def _text(self, server_round: int) -> str:
        auc = "-" if math.isnan(self.auc) else f"{self.auc:.4f}"
        return (f"round {min(server_round, self.rounds)}/{self.rounds} · hospitals trained "
                f"{self.done_in_round}/{self.hospitals} · test AUC {auc}")

    def __enter__(self) -> RoundProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def on_reply(self, reply: Reply) -> None:
        if reply.phase == "train":
            self.done_in_round += 1
            self.progress.update(self.task, description=self._text(reply.server_round))

    def on_round(self, server_round: int, metrics: dict[str, float]) -> None:
        """After round ``server_round``'s central evaluation (0: the initial adapter's)."""
        self.auc = float(metrics.get("test-auc", math.nan))
        if server_round == 0:
            self.progress.update(self.task, description=self._text(1))
        elif server_round < self.rounds:
            self.done_in_round = 0
            self.progress.update(self.task, advance=1, description=self._text(server_round + 1))
        else:  # the last round: its line stays as it ended, hospitals and all
            self.progress.update(self.task, advance=1, description=self._text(server_round))
