"""The coordinator drops malformed updates with a reason instead of aggregating them."""

import numpy as np
from flwr.app import Array, ArrayRecord

from strategies.base import check_update


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
