"""The simulation's progress line says where the run stands, last round included."""

from io import StringIO

from rich.console import Console

from simulations.progress import RoundProgress
from strategies import Reply


def test_the_last_line_counts_the_last_rounds_hospitals():
    out = StringIO()
    progress = RoundProgress(rounds=2, hospitals=3, console=Console(file=out, width=200))
    with progress:
        progress.on_round(0, {"test-auc": 0.5})
        for server_round in (1, 2):
            for node in range(3):
                progress.on_reply(Reply(server_round, "train", node_id=node))
            progress.on_reply(Reply(server_round, "evaluate", node_id=0))  # not training
            assert progress._text(server_round).count("hospitals trained 3/3") == 1
            progress.on_round(server_round, {"test-auc": 0.7 + server_round / 10})
    final = progress.progress.tasks[0]
    assert final.completed == 2
    assert final.description == "round 2/2 · hospitals trained 3/3 · test AUC 0.9000"
    assert "hospitals trained 3/3 · test AUC 0.9000" in out.getvalue()
