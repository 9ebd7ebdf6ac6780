"""The SecAgg+ neighbour graph: who shares secrets and masks with whom.

Bell et al. replace SecAgg's complete graph with a sparse random one so that each hospital's
work grows with ``log n`` rather than ``n``. Here: a Harary-style ring over a seeded random
permutation of the round's hospitals, each joined to the ``k // 2`` hospitals on either side
(``k`` = group size - 1, rounded down to even), or the complete graph when ``k >= n - 1``.
"""

from __future__ import annotations

import random


def neighbour_graph(nodes: list[int], group_size: int, seed: int) -> dict[int, list[int]]:
    """Each node's neighbours (sorted, itself excluded) for groups of ``group_size`` hospitals
    (a node and its neighbours: one Shamir share each)."""
    nodes = sorted(set(nodes))
    k = group_size - 1
    if k >= len(nodes) - 1:
        return {u: [v for v in nodes if v != u] for u in nodes}
    ring = nodes[:]
    random.Random(seed).shuffle(ring)
    half = max(1, k // 2)
    neighbours: dict[int, set[int]] = {u: set() for u in nodes}
    for i, u in enumerate(ring):
        for step in range(1, half + 1):
            v = ring[(i + step) % len(ring)]
            neighbours[u].add(v)
            neighbours[v].add(u)
    return {u: sorted(vs) for u, vs in neighbours.items()}
