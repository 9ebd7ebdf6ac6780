"""The published decision rule in plain sight: its prior, its accuracy beside always answering
the commonest class, and its recall per class (CLI table and ``medfed simulate --prior``)."""

import numpy as np
import pytest
from sklearn.metrics import recall_score

from medfed_cli.main import build_parser
from medfed_cli.simulate import _decision_line, _summary_rows, simulate_overrides
from models.metrics import decision_summary


def test_decision_summary_matches_sklearn_on_real_labels(pneumonia_small):
    labels = pneumonia_small.splits["test"].labels.numpy()
    rng = np.random.default_rng(0)
    predicted = np.where(rng.random(len(labels)) < 0.8, labels, 1 - labels)
    summary = decision_summary(labels, predicted, 2)
    assert summary["recall_per_class"] == pytest.approx(
        list(recall_score(labels, predicted, average=None)))
    assert summary["majority_rate"] == pytest.approx(np.bincount(labels).max() / len(labels))
    assert sum(summary["class_shares"]) == pytest.approx(1)
    assert sum(summary["predicted_shares"]) == pytest.approx(1)


def test_a_class_absent_from_the_labels_has_no_recall():
    summary = decision_summary(np.array([0, 0, 2]), np.array([0, 1, 2]), 3)
    assert np.isnan(summary["recall_per_class"][1])
    assert summary["recall_per_class"][0] == 0.5 and summary["majority_rate"] == 2 / 3


def test_the_table_shows_the_best_hospital_and_the_majority_rule_and_the_prior():
    summary = {
        "federated": {"auc": 0.9, "accuracy": 0.8, "balanced_accuracy": 0.7, "macro_f1": 0.7},
        "local": {"auc": 0.8, "accuracy": 0.7, "balanced_accuracy": 0.6, "macro_f1": 0.6,
                  "best_hospital": {"hospital": 3, "train_examples": 412, "auc": 0.85,
                                    "accuracy": 0.75, "balanced_accuracy": 0.7,
                                    "macro_f1": 0.7}},
        "decision": {"majority_rate": 0.625, "class_shares": [0.375, 0.625],
                     "recall_per_class": [0.6, 0.9]},
        "published": {"prior": "equal class priors"}, "classes": ["normal", "pneumonia"]}
    rows = dict(_summary_rows(summary))
    assert rows["best hospital alone (#3, 412 examples)"]["auc"] == 0.85
    majority = rows["always the commonest class"]
    assert majority["accuracy"] == 0.625 and majority["balanced_accuracy"] == 0.5
    assert majority["macro_f1"] == pytest.approx(2 * 0.625 / 1.625 / 2)
    line = _decision_line(summary)
    assert "equal class priors" in line and "normal 0.600" in line and "pneumonia 0.900" in line


@pytest.mark.parametrize(("flag", "prior"), [("equal", []), ("0.27,0.73", [0.27, 0.73])])
def test_simulate_takes_the_prior(flag, prior):
    args = build_parser().parse_args(["simulate", "--prior", flag])
    assert simulate_overrides(args)["evaluation"]["prior"] == prior


def test_a_malformed_prior_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--prior", "half,half"])
    assert "one share per class" in capsys.readouterr().err


def test_multi_class_auc_stays_defined_when_a_split_lacks_a_class(recwarn):
    """A hospital's validation split without one of five classes still has an AUC (the mean
    one-vs-rest AUC over the classes it holds), with no sklearn warning; with every class
    present it is sklearn's macro one-vs-rest AUC."""
    from sklearn.metrics import roc_auc_score

    from models.metrics import classification_metrics

    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(5), 8)
    probs = rng.dirichlet(np.ones(5), len(labels))
    probs[np.arange(len(labels)), labels] += 0.5
    probs /= probs.sum(axis=1, keepdims=True)
    full = classification_metrics(labels, probs)["auc"]
    assert full == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
    lacking = labels != 3
    auc = classification_metrics(labels[lacking], probs[lacking])["auc"]
    assert np.isfinite(auc)
    kept, kept_probs = labels[lacking], probs[lacking]
    assert auc == pytest.approx(np.mean([roc_auc_score(kept == c, kept_probs[:, c])
                                         for c in (0, 1, 2, 4)]))
    assert not [w for w in recwarn if "UndefinedMetric" in type(w.message).__name__]
