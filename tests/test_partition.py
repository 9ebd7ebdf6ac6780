"""Partitioning a training split over hospitals."""

import numpy as np
import pytest

from simulations.partition import MIN_PER_HOSPITAL, partition, train_val_split


@pytest.fixture(scope="module")
def labels(pneumonia_small):
    return pneumonia_small.splits["train"].labels.numpy()


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_disjoint_cover_and_reproducible(labels, scheme):
    parts = partition(labels, 5, scheme, alpha=0.5, seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) == len(np.unique(joined))
    again = partition(labels, 5, scheme, alpha=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert min(len(p) for p in parts) >= MIN_PER_HOSPITAL


def test_dirichlet_skews_labels_more_than_iid(labels):
    def spread(parts):
        return np.std([labels[p].mean() for p in parts])

    assert spread(partition(labels, 5, "dirichlet", 0.3, 0)) > 3 * spread(
        partition(labels, 5, "iid", 0.3, 0))


def test_train_val_split_is_disjoint():
    train, val = train_val_split(np.arange(100), 0.1, seed=0)
    assert len(val) == 10 and len(train) == 90
    assert not set(train) & set(val)


def test_bad_settings_are_refused(labels):
    with pytest.raises(ValueError, match="alpha"):
        partition(labels, 5, "dirichlet", alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="unknown partition"):
        partition(labels, 5, "by-scanner", alpha=1.0, seed=0)
