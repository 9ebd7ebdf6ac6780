"""The coordinator drops malformed updates with a reason instead of aggregating them."""

import numpy as np
from flwr.app import Array, ArrayRecord

from core.flower_compat import set_message_id, set_source_node
from strategies.replies import check_update


def _record(**arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def test_good_update_passes():
    ref = _record(a=np.zeros((2, 3), np.float32), b=np.ones(4, np.float32))
    assert check_update(_record(a=np.ones((2, 3), np.float32), b=np.ones(4, np.float32)), ref) == ""


def test_each_defect_is_named():
    ref = _record(a=np.zeros((2, 3), np.float32))
    assert "names differ" in check_update(_record(z=np.zeros((2, 3), np.float32)), ref)
    assert "'a'" in check_update(_record(a=np.zeros((3, 2), np.float32)), ref)
    assert "'a'" in check_update(_record(a=np.zeros((2, 3), np.float64)), ref)
    nan = np.zeros((2, 3), np.float32)
    nan[0, 0] = np.nan
    assert "non-finite" in check_update(_record(a=nan), ref)


def test_superlink_error_for_a_dead_hospital_is_recorded_under_that_hospital():
    """Flower's SuperLink answers for a node whose heartbeat stopped, from its own node id
    (1): the records must name the hospital that was asked, not node 1."""
    import pytest
    from flwr.app import ConfigRecord, Error, Message

    from simulations.inprocess import InProcessGrid
    from strategies import build_strategy
    from strategies.adapter import TooFewUpdates

    seen = []
    strategy = build_strategy("fedavg", min_train_nodes=2, min_available_nodes=2,
                              observer=seen.append)
    grid = InProcessGrid(None, {101: {}, 202: {}})
    arrays = _record(a=np.zeros((2, 3), np.float32))
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    for k, msg in enumerate(messages):
        set_message_id(msg, f"sent-{k}")
    replies = []
    for msg in messages:
        reply = Message(Error(code=0, reason="Error: Node Unavailable"), reply_to=msg)
        set_source_node(reply, 1)  # as the SuperLink sends it
        replies.append(reply)
    with pytest.raises(TooFewUpdates):
        strategy.aggregate_train(1, replies)
    assert sorted(r.node_id for r in seen) == [101, 202]
    assert all("Node Unavailable" in r.error for r in seen)
