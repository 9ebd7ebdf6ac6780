"""The coordinator daemon's small parts, without processes: advice that fits why a run did not
finish, every refusal kept in the records, the streamed log printed once, the node listing read
strictly (a SuperLink that does not answer is not an empty registry)."""

from __future__ import annotations

import io

import pytest

from server.checkpoint import CHECKPOINT_FILE
from server.daemon import (
    SuperLinkError,
    copy_once,
    last_run_error,
    registry_nodes,
    run_advice,
)
from server.records import RunRecords
from strategies.replies import Reply


def _reply(phase: str, error: str) -> Reply:
    return Reply(node_id=7, server_round=1, phase=phase, metrics={}, error=error)


def test_a_training_refusal_is_not_overwritten_by_the_evaluation_refusal(tmp_path):
    records = RunRecords(tmp_path)
    records.add_reply(_reply("train", "privacy policy refused: budget spent"))
    records.add_reply(_reply("evaluate", "run policy refused: evaluations capped"))
    records.add_reply(_reply("evaluate", "run policy refused: evaluations capped"))
    (row,) = records.rows.values()
    assert row["error"] == ("train: privacy policy refused: budget spent; "
                            "evaluate: run policy refused: evaluations capped")


def test_advice_fits_the_failure(tmp_path):
    assert "start it over" in run_advice(tmp_path, 0)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"x")
    assert "resume from its last completed round" in run_advice(tmp_path, 1)
    records = RunRecords(tmp_path)
    records.add_reply(_reply("train", "privacy policy refused: budget spent"))
    records.write_metrics()
    advice = run_advice(tmp_path, 1)
    assert "refused again until those hospitals change their policies" in advice
    assert "run the same command again: it resumes from its last completed round" in advice
    (tmp_path / CHECKPOINT_FILE).unlink()
    assert "it starts over" in run_advice(tmp_path, 1)


def test_an_evaluation_refusal_alone_is_not_why_a_run_ended(tmp_path):
    records = RunRecords(tmp_path)
    records.add_reply(_reply("evaluate", "run policy 'min_evaluation_examples': 2 examples"))
    records.write_metrics()
    assert last_run_error(tmp_path) == ""
    (row,) = records.rows.values()
    assert row["evaluation_error"].startswith("run policy 'min_evaluation_examples'")


def test_the_streamed_run_log_prints_each_line_once():
    streamed = ["\x1b[92mINFO \x1b[0m:      [ROUND 1/2]\n",
                "12/01/2026 14:01:19:INFO:[ROUND 1/2]\n",
                "2026-12-01 14:01:19,731 INFO server.deployment_app: round 0 of 2\n",
                "12/01/2026 14:01:20:INFO:something not printed before\n"]
    out = io.StringIO()
    copy_once(streamed, out)
    assert out.getvalue().splitlines() == [line.rstrip("\n") for i, line in
                                           enumerate(streamed) if i != 1]


def test_a_superlink_that_does_not_answer_is_not_an_empty_registry():
    with pytest.raises(SuperLinkError, match="did not answer"):
        registry_nodes('{"success": false, "error-message": "connection refused"}')
    with pytest.raises(SuperLinkError, match="did not answer"):
        registry_nodes("")
    listing = ('{"success": true, "nodes": [{"node-id": "1", "status": "online"}, '
               '{"node-id": "2", "status": "unregistered"}]}')
    assert list(registry_nodes(listing)) == ["1"]


def test_a_node_leaving_between_count_and_sampling_does_not_stall_the_round():
    """Flower counts nodes, then waits for that many: a revoked node leaving in between made
    the wait endless. The strategy's grid answers its count and its first wait alike."""
    from server.checkpoint import _SteadyNodeCount

    class Grid:
        def __init__(self) -> None:
            self.answers = [[1, 2], [1], [1], [1, 3]]

        def get_node_ids(self):
            return self.answers.pop(0)

    grid = _SteadyNodeCount(Grid())
    assert grid.get_node_ids() == [1, 2]
    assert grid.get_node_ids() == [1, 2]  # the wait sees what the count saw
    assert grid.get_node_ids() == [1]  # a real wait asks again
    assert grid.get_node_ids() == [1]
