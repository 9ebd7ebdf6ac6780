"""The segmentation bench's fixed split, hospital sizes and FedAvg (cheap: no network runs)."""

from __future__ import annotations

import pytest
import torch

from simulations.bench.segmentation import (
    case_counts,
    fedavg,
    hippocampus_dir,
    hospital_parts,
    split_cases,
)


def test_case_counts_are_skewed_sum_up_and_give_everyone_a_case():
    assert case_counts(10, 5) == [4, 3, 1, 1, 1]
    for cases, hospitals in [(5, 5), (15, 5), (40, 7)]:
        counts = case_counts(cases, hospitals)
        assert sum(counts) == cases and min(counts) >= 1 and counts == sorted(counts)[::-1]
    with pytest.raises(ValueError):
        case_counts(3, 5)


def test_hospital_parts_hold_whole_cases():
    cases = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4])
    parts = hospital_parts(cases, 5, 3, seed=0)
    joined = torch.cat(parts).sort().values
    assert torch.equal(joined, torch.arange(len(cases)))
    owners = [set(cases[p].tolist()) for p in parts]
    assert all(a.isdisjoint(b) for i, a in enumerate(owners) for b in owners[i + 1:])


def test_fedavg_weights_by_slice_count():
    states = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([4.0, 3.0])}]
    assert torch.allclose(fedavg(states, [2, 1])["w"], torch.tensor([2.0, 1.0]))


def test_split_is_by_case_disjoint_and_seeded():
    try:
        data = hippocampus_dir()
    except FileNotFoundError:
        pytest.skip("no hippocampus data")
    sizes = {"train": 10, "val": 2, "test": 3}
    split = split_cases(data, sizes, seed=0)
    assert {k: len(v) for k, v in split.items()} == sizes
    assert len(set().union(*split.values())) == 15
    assert split == split_cases(data, sizes, seed=0) != split_cases(data, sizes, seed=1)
