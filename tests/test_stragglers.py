"""Issue 8: slow (not failing) hospitals. A straggler's reply comes after the round timeout; the
coordinator aggregates those that answered in time and records the straggler as late.

In-process (no Flower runtime; sub-second delays): the coordinator-side hold-back of a
straggler's reply, and the strategy's bookkeeping of who was asked and who answered. A Flower
simulation with a round timeout must wait the timeout out, and the timeout has to cover Ray
actors starting within round 1 (minutes on a loaded 2-core machine), so that is not a unit test
(scenario ``slow-hospitals``; README "Scenarios" has a measured run).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from simulations.dropouts import drops_out
from simulations.stragglers import straggles

SEED = 1
PROBABILITY = 0.34


def test_stragglers_are_seeded_at_the_asked_rate_and_independent_of_dropouts():
    draws = [straggles(0.2, 5, r, h) for r in range(1, 51) for h in range(40)]
    assert draws == [straggles(0.2, 5, r, h) for r in range(1, 51) for h in range(40)]
    assert np.mean(draws) == pytest.approx(0.2, abs=0.03)
    dropped = [drops_out(0.2, 5, r, h) for r in range(1, 51) for h in range(40)]
    assert draws != dropped
    assert not any(straggles(0.0, 5, 1, h) for h in range(100))
    with pytest.raises(ValueError, match="straggler_probability"):
        straggles(-0.1, 5, 1, 0)


def test_strategy_aggregates_the_replies_in_time_and_records_the_missing_as_late(monkeypatch):
    """Flower hands ``aggregate_train`` only the replies that came before the timeout."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from simulations.inprocess import message_with_metadata
    from strategies import StrategyOptions, build_strategy
    from strategies.adapter import LATE

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)

    class Grid:
        def get_node_ids(self):
            return [11, 12, 13]

    seen = []
    strategy = build_strategy("fedavg", observer=seen.append, min_train_nodes=1,
                              min_available_nodes=1, options=StrategyOptions())
    global_arrays = ArrayRecord({"head.weight": Array(np.zeros(3, np.float32))})
    asked = list(strategy.configure_train(1, global_arrays, ConfigRecord(), Grid()))
    assert sorted(m.metadata.dst_node_id for m in asked) == [11, 12, 13]
    replies = [message_with_metadata(
        "train", RecordDict({"arrays": ArrayRecord({"head.weight": Array(np.full(3, v,
                                                                                 np.float32))}),
                             "metrics": MetricRecord({"num-examples": 10})}),
        src_node_id=node, dst_node_id=0, message_id=f"r{node}") for node, v in ((11, 1.0),
                                                                             (13, 3.0))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["head.weight"].numpy(), 2.0)  # the two in time
    late = [r for r in seen if r.error]
    assert [(r.node_id, r.phase, r.error) for r in late] == [(12, "train", LATE)]
    # The next round asks afresh: nothing left over from this one.
    assert strategy.record_late(2, "train", []) == []


def test_a_stragglers_reply_is_held_back_past_the_timeout_and_released_after_its_delay():
    """Hospital 1 straggles in round 1 (seed 1): a round whose timeout is shorter than the
    delay gets the other two replies; one that waits longer gets all three, the straggler's no
    sooner than the delay. The hospitals answered at once: nothing slept on their side."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from simulations.inprocess import InProcessGrid, coordinator_message
    from simulations.stragglers import StragglerGrid

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        hospital = int(context.node_config["partition-id"])
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1,
                                                             "hospital-id": hospital})}),
                       reply_to=msg)

    nodes = {100 + k: {"partition-id": k} for k in range(3)}
    delay_s = 0.6
    grid = StragglerGrid(InProcessGrid(app, nodes), PROBABILITY, delay_s, SEED,
                         poll_interval_s=0.02)

    def round_one(timeout: float) -> tuple[list[int], float]:
        messages = [coordinator_message("train", ArrayRecord(), ConfigRecord({"server-round": 1}),
                                        dst_node_id=node) for node in nodes]
        start = time.monotonic()
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        return (sorted(int(r.content["metrics"]["hospital-id"]) for r in replies),
                time.monotonic() - start)

    in_time, _ = round_one(timeout=0.2)
    assert in_time == [0, 2]
    everyone, waited = round_one(timeout=5.0)
    assert everyone == [0, 1, 2] and waited >= delay_s
    with pytest.raises(ValueError, match="straggler_delay_s"):
        StragglerGrid(InProcessGrid(app, nodes), PROBABILITY, -1.0, SEED)


def test_a_hospital_late_before_its_first_reply_is_filed_under_its_name(tmp_path):
    """Late in round 1, the coordinator knows only the node id; the hospital's first reply
    (round 2) names it, and the round-1 row moves to that hospital's line."""
    from server.records import RunRecords
    from strategies.adapter import LATE
    from strategies.replies import Reply

    records = RunRecords(tmp_path)
    records.add_reply(Reply(1, "train", node_id=12, error=LATE))
    records.add_reply(Reply(1, "train", node_id=11, metrics={"num-examples": 5,
                                                             "hospital-id": 0}))
    records.add_reply(Reply(2, "train", node_id=12, metrics={"num-examples": 7,
                                                             "hospital-id": 1}))
    rows = {(r["round"], r["hospital"]): r for r in records.train_rows()}
    assert sorted(rows) == [(1, "0"), (1, "1"), (2, "1")]
    assert rows[(1, "1")]["error"] == f"train: {LATE}" and rows[(1, "1")]["node_id"] == 12
    assert rows[(2, "1")]["num_examples"] == 7
