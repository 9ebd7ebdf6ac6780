"""Split one training set over simulated hospitals: IID or Dirichlet label skew, seeded."""

from __future__ import annotations

import numpy as np

MIN_PER_HOSPITAL = 20


def iid_partition(num_examples: int, num_hospitals: int, seed: int) -> list[np.ndarray]:
    """Shuffle and deal out indices in near-equal shares."""
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_hospitals)]


def dirichlet_partition(
    labels: np.ndarray, num_hospitals: int, alpha: float, seed: int, max_tries: int = 100
) -> list[np.ndarray]:
    """Label skew: each class is split over hospitals in Dirichlet(alpha) proportions.

    Smaller ``alpha`` means more skew. Draws again (same seed stream) until every hospital holds at
    least ``MIN_PER_HOSPITAL`` examples, so that each can keep a validation split.
    """
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    labels = np.asarray(labels).reshape(-1)
    if len(labels) < num_hospitals * MIN_PER_HOSPITAL:
        raise ValueError(
            f"{len(labels)} examples cannot give {num_hospitals} hospitals "
            f"{MIN_PER_HOSPITAL} each: use fewer hospitals or more data"
        )
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        shares: list[list[int]] = [[] for _ in range(num_hospitals)]
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_hospitals))[:-1] * len(members))
            for hospital, part in enumerate(np.split(members, cuts.astype(int))):
                shares[hospital].extend(part.tolist())
        if min(len(s) for s in shares) >= MIN_PER_HOSPITAL:
            return [np.sort(np.array(s, dtype=np.int64)) for s in shares]
    raise ValueError(
        f"Dirichlet alpha={alpha} left a hospital with under {MIN_PER_HOSPITAL} examples in "
        f"{max_tries} draws: raise alpha or use fewer hospitals"
    )


def partition(
    labels: np.ndarray, num_hospitals: int, scheme: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Indices into the training set for each hospital, by ``scheme`` (``iid`` or ``dirichlet``)."""
    if num_hospitals < 1:
        raise ValueError(f"need at least one hospital, got {num_hospitals}")
    if scheme == "iid":
        return iid_partition(len(labels), num_hospitals, seed)
    if scheme == "dirichlet":
        return dirichlet_partition(labels, num_hospitals, alpha, seed)
    raise ValueError(f"unknown partition '{scheme}': use 'iid' or 'dirichlet'")


def train_val_split(
    indices: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A hospital's own train/validation split of its indices (at least one of each)."""
    order = np.random.default_rng(seed).permutation(indices)
    n_val = min(max(1, round(len(order) * val_fraction)), len(order) - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])
