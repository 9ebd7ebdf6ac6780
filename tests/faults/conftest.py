"""The fault tests' default consortium: two hospitals, a 2-round tiny study, per test."""

import pytest

from faults.harness import consortium, tiny_study


@pytest.fixture
def lc(tmp_path):
    """A fresh loopback consortium of :func:`faults.harness.tiny_study` (cleaned up after)."""
    with consortium(tmp_path, tiny_study()) as made:
        yield made
