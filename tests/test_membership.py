"""Membership inference (loss threshold): members and non-members matched by label counts, and the
attack's input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.training import train_local
from models.config import TrainConfig
from models.data import ImageSet
from models.lora import build_lora_model
from privacy.accounting import noise_for_target
from privacy.config import DPConfig
from privacy.dpsgd import plan_round, train_dpsgd
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


def test_dpsgd_weakens_the_attack_that_the_plain_adapter_lets_through(pneumonia_small,
                                                                       small_model_config):
    """Does DP do something? The same 64 real chest X-rays, the same steps and rate: the plain
    adapter memorises them (attack AUC well above 0.5), DP-SGD at epsilon 1 does not."""
    train, val = pneumonia_small.splits["train"], pneumonia_small.splits["val"]
    picked = train.subset(np.random.default_rng(0).choice(len(train), 64, replace=False))
    members, non_members = matched_non_members(picked, val, seed=0)
    config = TrainConfig(local_steps=60, batch_size=16, lr=2e-3, logit_adjust=False)

    torch.manual_seed(0)
    plain = build_lora_model(small_model_config)
    train_local(plain, members.images, members.labels, config, seed=0)
    dp = DPConfig(dpsgd=True, dp_target_epsilon=1.0, dp_run_rounds=1)
    plan = plan_round(len(members), config)
    noise = noise_for_target(1.0, dp.dp_delta, plan.sample_rate, plan.steps, dp.dp_accountant)
    torch.manual_seed(0)
    private = build_lora_model(small_model_config)
    train_dpsgd(private, members.images, members.labels, config, dp, noise, seed=0)

    leaked = loss_threshold_attack(plain, members, non_members)
    guarded = loss_threshold_attack(private, members, non_members)
    assert leaked.auc > 0.6
    assert guarded.auc < leaked.auc - 0.1
    assert abs(guarded.auc - 0.5) < 0.1
