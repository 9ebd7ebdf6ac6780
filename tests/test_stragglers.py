"""Issue 8: slow (not failing) hospitals. A straggler's reply comes after the round timeout; the
coordinator aggregates those that answered in time and records the straggler as late.

In-process (no Flower runtime, no waiting): the straggler ClientApp's delay, and the strategy's
bookkeeping of who was asked and who answered. A Flower simulation with a round timeout must
wait the timeout out, and the timeout has to cover Ray actors starting within round 1 (minutes
on a loaded 2-core machine), so that is not a unit test (scenario ``slow-hospitals``).
"""

from __future__ import annotations

import numpy as np
import pytest

from simulations.dropouts import drops_out, straggles

SEED = 1
PROBABILITY = 0.34
DELAY_S = 160.0


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


def test_a_straggling_hospital_replies_after_its_delay(monkeypatch):
    """The straggler ClientApp trains as usual, then waits ``straggler_delay_s`` (time.sleep is
    recorded here, not waited)."""
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

    from simulations import dropouts
    from simulations.inprocess import message_with_metadata

    slept = []
    monkeypatch.setattr(dropouts.time, "sleep", slept.append)

    def handle_train(msg, context, load_site, load_privacy):
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=msg)

    monkeypatch.setattr(dropouts, "handle_train", handle_train)
    app = dropouts.build_dropout_client_app(lambda context, size: None, 0.0, SEED,
                                            straggler_probability=PROBABILITY,
                                            straggler_delay_s=DELAY_S)
    for hospital in (0, 1):
        msg = message_with_metadata("train", RecordDict({"config": ConfigRecord(
            {"server-round": 1})}), dst_node_id=hospital + 1)
        context = Context(run_id=1, node_id=hospital + 1,
                          node_config={"partition-id": hospital}, state=RecordDict(),
                          run_config={})
        reply = app(msg, context)
        assert not reply.has_error()
    assert slept == [DELAY_S]  # hospital 1 only (seed 1, round 1)
    with pytest.raises(ValueError, match="straggler_delay_s"):
        dropouts.build_dropout_client_app(lambda context, size: None, 0.0, SEED,
                                          straggler_delay_s=-1.0)
