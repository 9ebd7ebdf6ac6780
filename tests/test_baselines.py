"""The baselines publish as the federated run does, whether they score the test data every round
(pooled: ``test_auc_per_round``) or only the selected round's adapter (local)."""

import numpy as np
import pytest

from client.site import SiteData
from models.config import TrainConfig
from simulations.baselines import local_baseline, pooled_baseline


def test_one_hospital_alone_scores_as_the_pooled_baseline_on_its_data(pneumonia_small,
                                                                     small_model_config):
    """One hospital: the local baseline trains exactly as the pooled one (same data, seed and
    validation split); scoring only the selected round gives the pooled run's metrics of that
    round, which it scored after every round."""
    train_split, test_split = pneumonia_small.splits["train"], pneumonia_small.splits["test"]
    rng = np.random.default_rng(7)
    picks = rng.choice(len(train_split), 120, replace=False)
    site = SiteData(train=train_split.subset(picks[:80]), val=train_split.subset(picks[80:]))
    test = test_split.subset(rng.choice(len(test_split), 80, replace=False))
    train = TrainConfig(local_epochs=1, batch_size=16, lr=1e-3)

    pooled = pooled_baseline([site], test, small_model_config, train, rounds=2)
    local = local_baseline([site], test, small_model_config, train, rounds=2)
    alone = local["per_hospital"][0]
    assert len(pooled["test_auc_per_round"]) == 2
    assert len(set(pooled["test_auc_per_round"])) > 1  # the rounds differ: the choice matters
    assert alone["published_round"] == pooled["published_round"]
    assert alone["auc"] == pooled["test_auc_per_round"][pooled["published_round"] - 1]
    for name in ("auc", "accuracy", "loss"):
        assert alone[name] == pytest.approx(pooled[name], abs=1e-12), name


def test_the_best_single_hospital_is_chosen_on_every_hospitals_validation(pneumonia_small,
                                                                        small_model_config):
    """Two hospitals of different sizes: the best single hospital is the one whose own
    published adapter scores highest on both validation splits together (never the test set),
    reported with that adapter's test metrics."""
    train_split, test_split = pneumonia_small.splits["train"], pneumonia_small.splits["test"]
    rng = np.random.default_rng(11)
    picks = rng.choice(len(train_split), 200, replace=False)
    sites = [SiteData(train=train_split.subset(picks[:24]), val=train_split.subset(picks[24:44])),
             SiteData(train=train_split.subset(picks[44:164]),
                      val=train_split.subset(picks[164:]))]
    test = test_split.subset(rng.choice(len(test_split), 80, replace=False))
    train = TrainConfig(local_epochs=1, batch_size=16, lr=1e-3)
    local = local_baseline(sites, test, small_model_config, train, rounds=2)
    scores = [h["all_val_auc"] for h in local["per_hospital"]]
    best = local["best_hospital"]
    assert best["hospital"] == int(np.argmax(scores))
    assert best["train_examples"] == len(sites[best["hospital"]].train)
    assert best["auc"] == local["per_hospital"][best["hospital"]]["auc"]
    assert all(np.isfinite(scores)) and scores[0] != scores[1]


def test_best_hospital_skips_undefined_scores_and_keeps_the_earlier_on_a_tie():
    from simulations.baselines import best_hospital

    assert best_hospital([0.7, float("nan"), 0.9, 0.9], "auc") == 2
    with pytest.raises(ValueError, match="no hospital"):
        best_hospital([float("nan")], "auc")
