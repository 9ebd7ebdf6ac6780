"""Membership inference (loss threshold): members and non-members matched by label counts, and the
attack's input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.data import ImageSet
from privacy.membership import loss_threshold_attack, matched_non_members


def test_matched_non_members_have_the_members_label_counts(pneumonia_small):
    train, val = pneumonia_small.splits["train"], pneumonia_small.splits["val"]
    skewed = train.subset(np.flatnonzero(train.labels.numpy() == 1)[:50])
    skewed = ImageSet.concat([skewed, train.subset(np.flatnonzero(train.labels.numpy() == 0)[:5])])
    members, others = matched_non_members(skewed, val, seed=3, limit=40)
    assert len(members) == len(others) == 40
    assert torch.equal(torch.bincount(members.labels, minlength=2),
                       torch.bincount(others.labels, minlength=2))
    with pytest.raises(ValueError, match="equal"):
        loss_threshold_attack(torch.nn.Identity(), members, others.subset(np.arange(10)))
