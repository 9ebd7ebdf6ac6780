"""Slow (not failing) hospitals. A straggler's reply comes after the round timeout; the
coordinator aggregates those that answered in time and records the straggler as late.

In-process (no Flower runtime; sub-second delays): the coordinator-side hold-back of a
straggler's reply, and the strategy's bookkeeping of who was asked and who answered. A Flower
simulation with a round timeout must wait the timeout out, and the timeout has to cover Ray
actors starting within round 1 (minutes on a loaded 2-core machine), so that is not a unit test
(scenario ``slow-hospitals``; docs/benchmarks.md has a measured run).
"""

from __future__ import annotations

import numpy as np
import pytest

from core.flower_compat import task_identity
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


@pytest.fixture
def server_identity():
    """Flower's coordinator process sets its run id before a strategy builds messages."""
    with task_identity(run_id=1, node_id=0, task_id=1):
        yield


def test_strategy_aggregates_the_replies_in_time_and_records_the_missing_as_late(
        server_identity):
    """Flower hands ``aggregate_train`` only the replies that came before the timeout."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from simulations.inprocess import message_with_metadata
    from strategies import StrategyOptions, build_strategy
    from strategies.adapter import LATE

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


def test_a_stragglers_reply_is_held_back_until_its_delay_has_passed():
    """Hospital 1 straggles in round 1 (seed 1): the coordinator gets the other two replies at
    once and the straggler's only when its delay has passed on the grid's clock, which the test
    steps by hand (no waiting, so a loaded machine cannot change the outcome). The hospitals
    answered at once: nothing slept on their side."""
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
    delay_s, now = 600.0, [1000.0]
    grid = StragglerGrid(InProcessGrid(app, nodes), PROBABILITY, delay_s, SEED,
                         clock=lambda: now[0])

    def hospitals(replies) -> list[int]:
        return sorted(int(r.content["metrics"]["hospital-id"]) for r in replies)

    messages = [coordinator_message("train", ArrayRecord(), ConfigRecord({"server-round": 1}),
                                    dst_node_id=node) for node in nodes]
    pending = set(grid.push_messages(messages))
    assert hospitals(grid.pull_messages(pending)) == [0, 2]
    now[0] += delay_s - 1
    straggler = {m.metadata.message_id for m in messages if m.metadata.dst_node_id == 101}
    assert list(grid.pull_messages(straggler)) == []  # a round timeout now gets only two
    now[0] += 1
    assert hospitals(grid.pull_messages(straggler)) == [1]
    # A round's push forgets what the last one still held.
    pending = set(grid.push_messages([coordinator_message(
        "train", ArrayRecord(), ConfigRecord({"server-round": 2}), dst_node_id=node)
        for node in nodes]))
    on_time = [h for h in range(3) if not straggles(PROBABILITY, SEED, 2, h)]
    assert hospitals(grid.pull_messages(pending)) == on_time
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
