"""Split one training set over simulated hospitals: IID, Dirichlet label skew or quantity skew,
seeded."""

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


SIZE_DISTRIBUTIONS = ("lognormal", "powerlaw")


def hospital_sizes(num_examples: int, num_hospitals: int, distribution: str, skew: float,
                   seed: int) -> np.ndarray:
    """How many examples each hospital holds under quantity skew (sums to ``num_examples``).

    ``lognormal``: shares proportional to LogNormal(0, ``skew``) draws (``skew`` 0 is equal
    sizes; 1.5 gives a few large hospitals and many small ones, as in real consortia).
    ``powerlaw``: the k-th largest hospital's share is proportional to ``(k + 1) ** -skew``
    (Zipf-like), in a seeded random order. Every hospital gets at least ``MIN_PER_HOSPITAL``.
    """
    if skew < 0:
        raise ValueError(f"quantity skew must be >= 0, got {skew}")
    if num_examples < num_hospitals * MIN_PER_HOSPITAL:
        raise ValueError(
            f"{num_examples} examples cannot give {num_hospitals} hospitals "
            f"{MIN_PER_HOSPITAL} each: use fewer hospitals or more data"
        )
    rng = np.random.default_rng(seed)
    if distribution == "lognormal":
        weights = rng.lognormal(0.0, skew, num_hospitals)
    elif distribution == "powerlaw":
        weights = rng.permutation((np.arange(num_hospitals) + 1.0) ** -skew)
    else:
        raise ValueError(f"unknown size distribution '{distribution}': use one of "
                         f"{', '.join(SIZE_DISTRIBUTIONS)}")
    spare = num_examples - num_hospitals * MIN_PER_HOSPITAL
    sizes = MIN_PER_HOSPITAL + np.floor(weights / weights.sum() * spare).astype(np.int64)
    # Hand the examples lost to rounding down to the largest hospitals, one each.
    for k in np.argsort(-weights)[: num_examples - sizes.sum()]:
        sizes[k] += 1
    return sizes


def quantity_partition(num_examples: int, num_hospitals: int, distribution: str, skew: float,
                       seed: int) -> list[np.ndarray]:
    """Quantity skew: hospitals of different sizes (:func:`hospital_sizes`), labels as drawn."""
    sizes = hospital_sizes(num_examples, num_hospitals, distribution, skew, seed)
    order = np.random.default_rng(seed + 1).permutation(num_examples)
    return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


def partition(
    labels: np.ndarray, num_hospitals: int, scheme: str, alpha: float, seed: int,
    size_distribution: str = "lognormal", size_skew: float = 1.0,
) -> list[np.ndarray]:
    """Indices into the training set for each hospital, by ``scheme``: ``iid``, ``dirichlet``
    (label skew, ``alpha``) or ``quantity`` (size skew, ``size_distribution``/``size_skew``)."""
    if num_hospitals < 1:
        raise ValueError(f"need at least one hospital, got {num_hospitals}")
    if scheme == "iid":
        return iid_partition(len(labels), num_hospitals, seed)
    if scheme == "dirichlet":
        return dirichlet_partition(labels, num_hospitals, alpha, seed)
    if scheme == "quantity":
        return quantity_partition(len(labels), num_hospitals, size_distribution, size_skew, seed)
    raise ValueError(f"unknown partition '{scheme}': use 'iid', 'dirichlet' or 'quantity'")


def train_val_split(
    indices: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A hospital's own train/validation split of its indices (at least one of each)."""
    order = np.random.default_rng(seed).permutation(indices)
    n_val = min(max(1, round(len(order) * val_fraction)), len(order) - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])
