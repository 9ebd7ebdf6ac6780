"""Scenarios (quantity skew, scanner shift, dropouts, sweeps) and the HTML report.

One real tiny run (3 hospitals, 1 round, 32 px, quantity skew + scanner shift + dropouts) feeds
the report tests.
"""

from __future__ import annotations

import base64
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from models.data import ImageSet
from simulations.config import ConfigError, DataConfig, load_config
from simulations.dropouts import drops_out
from simulations.partition import MIN_PER_HOSPITAL, hospital_sizes, partition
from simulations.report import (
    bootstrap_auc_ci,
    build_report,
    expected_calibration_error,
    load_run,
    score_final_model,
)
from simulations.scenarios import load_scenario, scenario_names
from simulations.shift import ScannerProfile, apply_profile, scanner_profile, shift_site
from simulations.sites import hospital_sites
from simulations.sweep import grid_points, parse_grid, sweep_configs

DROPOUT = 0.3
SEED = 0


def tiny_config(run_dir, baselines=("pooled", "local")):
    return load_config(None, {
        "seed": SEED, "run_dir": str(run_dir), "baselines": list(baselines),
        "data": {"num_hospitals": 3, "partition": "quantity", "size_skew": 1.0,
                 "shift": "scanners", "max_train_examples": 200, "max_test_examples": 120},
        "model": {"image_size": 32, "lora_r": 4, "lora_alpha": 8},
        "federation": {"rounds": 1, "min_hospitals": 2},
        "train": {"batch_size": 16, "local_epochs": 1, "lr": 1e-3},
        "failures": {"dropout_probability": DROPOUT},
    })


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from simulations.runner import run_study

    run_dir = tmp_path_factory.mktemp("study") / "tiny-run"
    summary = run_study(tiny_config(run_dir))
    return run_dir, summary


# ------------------------------------------------------------------ scenarios


def test_every_named_scenario_loads():
    names = scenario_names()
    assert {"quick", "label-skew", "quantity-skew", "scanner-shift", "unreliable-hospitals",
            "private", "many-hospitals", "slow-hospitals"} <= set(names)
    for name in names:
        config = load_scenario(name)
        assert config.federation.min_hospitals <= config.data.num_hospitals, name
    assert load_scenario("quantity-skew").data.partition == "quantity"
    assert load_scenario("scanner-shift").data.shift == "scanners"
    assert load_scenario("unreliable-hospitals").failures.dropout_probability > 0
    slow = load_scenario("slow-hospitals")
    assert 0 < slow.federation.round_timeout_s < slow.failures.straggler_delay_s


def test_unknown_scenario_names_the_known_ones():
    with pytest.raises(ConfigError, match="label-skew"):
        load_scenario("no-such-study")


def test_quantity_skew_is_seeded_and_skewed():
    sizes = hospital_sizes(5000, 10, "lognormal", 1.5, seed=3)
    assert sizes.sum() == 5000 and sizes.min() >= MIN_PER_HOSPITAL
    assert np.array_equal(sizes, hospital_sizes(5000, 10, "lognormal", 1.5, seed=3))
    assert not np.array_equal(sizes, hospital_sizes(5000, 10, "lognormal", 1.5, seed=4))
    assert sizes.max() > 4 * sizes.min()
    equal = hospital_sizes(5000, 10, "lognormal", 0.0, seed=3)
    assert equal.max() - equal.min() <= 1
    power = np.sort(hospital_sizes(5000, 10, "powerlaw", 1.0, seed=3))[::-1]
    assert power[0] > 5 * power[-1]
    labels = np.random.default_rng(0).integers(0, 2, 5000)
    shares = partition(labels, 10, "quantity", 0.5, 3, "lognormal", 1.5)
    assert sorted(np.concatenate(shares).tolist()) == list(range(5000))
    assert [len(s) for s in shares] == sizes.tolist()


def test_scanner_shift_is_seeded_and_does_what_it_says(pneumonia_small):
    images = pneumonia_small.splits["val"].images[:64]
    assert scanner_profile(2, SEED) == scanner_profile(2, SEED)
    assert scanner_profile(2, SEED) != scanner_profile(3, SEED)
    assert scanner_profile(2, SEED, strength=0.0) == ScannerProfile()
    assert torch.equal(apply_profile(images, ScannerProfile(), 0), images)

    a = apply_profile(images, scanner_profile(2, SEED), 11)
    assert torch.equal(a, apply_profile(images, scanner_profile(2, SEED), 11))
    assert a.shape == images.shape and a.min() >= 0 and a.max() <= 1

    def edges(x):  # mean absolute difference of neighbouring pixels: high for sharp images
        return (x[..., 1:] - x[..., :-1]).abs().mean().item()

    assert edges(apply_profile(images, ScannerProfile(blur_sigma=1.5), 0)) < 0.7 * edges(images)
    noisy = apply_profile(images, ScannerProfile(noise_std=0.05), 0)
    inside = (images > 0.1) & (images < 0.9)  # away from the clamp at 0 and 1
    assert (noisy - images)[inside].std().item() == pytest.approx(0.05, rel=0.15)
    darker = apply_profile(images, ScannerProfile(gamma=1.5), 0)
    assert darker.mean() < images.mean() - 0.02
    brighter = apply_profile(images, ScannerProfile(gain=1.0, offset=0.05), 0)
    assert (brighter - images)[images < 0.9].mean().item() == pytest.approx(0.05, abs=1e-4)

    site = ImageSet(images, pneumonia_small.splits["val"].labels[:64])
    assert shift_site(site, "none", 0, SEED) is site
    with pytest.raises(ValueError, match="scanners"):
        shift_site(site, "mri", 0, SEED)


def test_same_seed_same_hospitals_with_skew_and_shift(pneumonia_small):
    data = DataConfig(num_hospitals=4, partition="quantity", shift="scanners",
                      max_train_examples=400)
    first, again = hospital_sites(data, 32, SEED), hospital_sites(data, 32, SEED)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.train.images, b.train.images)
        assert torch.equal(a.val.labels, b.val.labels)
    other = hospital_sites(data, 32, SEED + 1)
    assert any(len(a.train) != len(b.train) for a, b in zip(first, other, strict=True))


def test_dropouts_are_seeded_at_the_asked_rate():
    draws = [drops_out(0.2, 5, r, h) for r in range(1, 51) for h in range(40)]
    assert draws == [drops_out(0.2, 5, r, h) for r in range(1, 51) for h in range(40)]
    assert np.mean(draws) == pytest.approx(0.2, abs=0.03)
    assert not any(drops_out(0.0, 5, 1, h) for h in range(100))
    with pytest.raises(ValueError, match="dropout_probability"):
        drops_out(1.5, 5, 1, 0)


def test_sweep_grid_gives_one_checked_config_per_point(tmp_path):
    grid = parse_grid(["data.num_hospitals=3,5", "data.partition=iid,quantity"])
    assert grid == {"data.num_hospitals": [3, 5], "data.partition": ["iid", "quantity"]}
    assert len(grid_points(grid)) == 4
    configs = sweep_configs(load_scenario("quick"), grid, tmp_path)
    dirs = {c.run_dir for _, c in configs}
    assert len(dirs) == 4 and all(d.startswith(str(tmp_path)) for d in dirs)
    assert {(c.data.num_hospitals, c.data.partition) for _, c in configs} == {
        (3, "iid"), (3, "quantity"), (5, "iid"), (5, "quantity")}
    with pytest.raises(ConfigError, match="num_hospital"):
        sweep_configs(load_scenario("quick"), parse_grid(["data.num_hospital=3"]), tmp_path)
    with pytest.raises(ConfigError, match="SECTION.KEY"):
        parse_grid(["data.alpha"])


# ------------------------------------------------------------------ metrics of the report


def test_ece_is_small_when_confidence_matches_accuracy_and_large_when_overconfident():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1.0, 20000)
    correct = rng.uniform(size=20000) < confidence
    labels = np.where(correct, 1, 0)
    probs = np.stack([1 - confidence, confidence], axis=1)
    assert expected_calibration_error(labels, probs) < 0.02
    overconfident = np.stack([np.full(20000, 0.01), np.full(20000, 0.99)], axis=1)
    coin = rng.integers(0, 2, 20000)
    assert expected_calibration_error(coin, overconfident) == pytest.approx(0.49, abs=0.02)


def test_bootstrap_interval_holds_the_auc_and_narrows_with_more_data():
    rng = np.random.default_rng(1)

    def scores(n):
        labels = rng.integers(0, 2, n)
        p = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.25, n), 0, 1)
        return labels, np.stack([1 - p, p], axis=1)

    from sklearn.metrics import roc_auc_score

    small, large = scores(100), scores(2000)
    lo_s, hi_s = bootstrap_auc_ci(*small, resamples=300)
    lo_l, hi_l = bootstrap_auc_ci(*large, resamples=300)
    assert lo_s < roc_auc_score(small[0], small[1][:, 1]) < hi_s
    assert lo_l < roc_auc_score(large[0], large[1][:, 1]) < hi_l
    assert hi_l - lo_l < 0.5 * (hi_s - lo_s)


# ------------------------------------------------------------------ the tiny run and its report


@pytest.mark.slow
def test_dropped_hospitals_are_recorded_and_the_round_survives(tiny_run):
    run_dir, summary = tiny_run
    expected = {h for h in range(3) if drops_out(DROPOUT, SEED, 1, h)}
    assert expected, "the seed should make a hospital drop out; pick another SEED"
    metrics = pd.read_csv(run_dir / "metrics.csv", dtype={"hospital": str, "error": str})
    errors = metrics[(metrics["round"] == 1) & metrics["error"].notna()]
    dropped = {int(m) for m in errors["error"].str.extract(r"hospital (\d+) in round 1")[0]}
    assert dropped == expected
    trained = metrics[(metrics["round"] == 1) & metrics["train_loss"].notna()]
    assert len(trained) == 3 - len(expected)
    assert np.isfinite(summary["federated"]["auc"])


@pytest.mark.slow
def test_same_config_and_seed_give_the_same_metrics(tiny_run, tmp_path):
    from simulations.runner import run_study

    run_dir, summary = tiny_run
    again = run_study(tiny_config(tmp_path / "again", baselines=()))
    assert again["federated"]["auc"] == pytest.approx(summary["federated"]["auc"], abs=1e-6)
    first = pd.read_csv(run_dir / "metrics.csv", dtype={"hospital": str})
    second = pd.read_csv(tmp_path / "again" / "metrics.csv", dtype={"hospital": str})
    columns = ["train_loss", "val_loss", "val_auc", "test_loss", "test_auc", "num_examples"]
    # Same rows (error rows may sit under a node id, which Flower draws anew: drop those).
    first, second = (m[m["error"].isna()].sort_values(["round", "hospital"]) for m in
                     (first, second))
    np.testing.assert_allclose(first[columns].to_numpy(float), second[columns].to_numpy(float),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_final_model_scores_match_the_run(tiny_run):
    run_dir, summary = tiny_run
    scores = score_final_model(load_run(run_dir))
    assert scores.auc == pytest.approx(summary["federated"]["auc"], abs=1e-6)
    assert scores.auc_ci[0] <= scores.auc <= scores.auc_ci[1]
    assert 0 <= scores.ece <= 1
    assert scores.probs.shape == (120, 2)


@pytest.mark.slow
def test_report_of_one_run_has_every_section(tiny_run, tmp_path):
    run_dir, summary = tiny_run
    page_path = build_report([run_dir], tmp_path / "report")
    page = page_path.read_text()
    figures = sorted(p.stem for p in (tmp_path / "report" / "figures").glob("*.png"))
    assert figures == sorted(["test-curves", "validation-curves", "hospital-validation",
                              "baselines", "roc", "confusion", "calibration", "bytes"])
    # Self-contained: every figure inline as a PNG that decodes, none linked.
    inline = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(inline) == len(figures)
    assert all(base64.b64decode(b).startswith(b"\x89PNG") for b in inline)
    assert "src=\"figures/" not in page and "http" not in page.split("</style>")[1]
    assert page.count("What this shows:") == len(figures)
    for text in ("Test AUC and loss per round", "Validation metrics at each hospital",
                 "Federated vs pooled vs local", "ROC curve", "Confusion matrix",
                 "Calibration", "Communication per round", "simulated dropout", "95% CI",
                 "scanner shift"):
        assert text in page, text
    assert f"{summary['federated']['auc']:.3f}" in page
    assert "Privacy budget" not in page  # no DP in this run: no epsilon figure


@pytest.mark.slow
def test_report_of_two_runs_compares_them(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    other = tmp_path / "other-run"
    shutil.copytree(run_dir, other)
    page = build_report([run_dir, other], tmp_path / "compare", score_model=False).read_text()
    assert "Comparison" in page and "tiny-run" in page and "other-run" in page
    table = pd.read_csv(tmp_path / "compare" / "comparison.csv")
    assert list(table["run"]) == ["tiny-run", "other-run"]
    assert table["settings that differ"].isna().all()  # same config: nothing differs
    assert (tmp_path / "compare" / "figures" / "compare-test-curves.png").is_file()
    assert (tmp_path / "compare" / "figures" / "tiny-run-baselines.png").is_file()


@pytest.mark.slow
def test_report_plots_epsilon_when_the_run_has_dp_columns(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    dp_run = tmp_path / "dp-run"
    shutil.copytree(run_dir, dp_run)
    metrics = pd.read_csv(dp_run / "metrics.csv", dtype={"hospital": str})
    trained = metrics["train_loss"].notna()
    metrics.loc[trained, "epsilon"] = 1.5
    metrics.loc[trained, "delta"] = 1e-5
    metrics.to_csv(dp_run / "metrics.csv", index=False)
    page = build_report([dp_run], tmp_path / "dp-report", score_model=False).read_text()
    assert "Privacy budget spent per hospital" in page
    assert (tmp_path / "dp-report" / "figures" / "epsilon.png").is_file()


@pytest.mark.slow
def test_tensorboard_events_hold_the_run_metrics(tiny_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from simulations.tracking import write_tensorboard

    run_dir, _ = tiny_run
    run = load_run(run_dir)
    events = EventAccumulator(str(write_tensorboard(run, tmp_path / "tb"))).Reload()
    logged = [(e.step, e.value) for e in events.Scalars("test/auc")]
    expected = list(zip(run.test_rows["round"], run.test_rows["test_auc"], strict=True))
    assert [s for s, _ in logged] == [s for s, _ in expected]
    np.testing.assert_allclose([v for _, v in logged], [v for _, v in expected], rtol=1e-6)
    assert "communication/upload_mb" in events.Tags()["scalars"]


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    from simulations.report import ReportError

    with pytest.raises(ReportError, match="summary.json"):
        build_report([tmp_path], tmp_path / "out")


@pytest.mark.slow
def test_mlflow_run_holds_the_settings_round_metrics_and_summary(tiny_run, tmp_path):
    # mlflow-skinny is in the [dev] extra: a missing install fails here, it is not skipped.
    from mlflow.tracking import MlflowClient

    from simulations.config import config_dict
    from simulations.tracking import mlflow_uri, track_run

    run_dir, summary = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert track_run(copy, False) is None and not (copy / "mlflow.db").exists()  # off: nothing
    assert load_config(None, {}).tracking.mlflow is False
    assert config_dict(load_config(None, {"tracking": {"mlflow": True}}))["tracking"]["mlflow"]
    run_id = track_run(copy, True, "study")
    client = MlflowClient(tracking_uri=mlflow_uri(copy))
    logged = client.get_run(run_id)
    assert logged.data.params["data.num_hospitals"] == "3"
    assert logged.data.params["failures.dropout_probability"] == str(DROPOUT)
    run = load_run(copy)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "test/auc"))
    expected = list(zip(run.test_rows["round"], run.test_rows["test_auc"], strict=True))
    assert [s for s, _ in history] == [s for s, _ in expected]
    np.testing.assert_allclose([v for _, v in history], [v for _, v in expected], rtol=1e-6)
    assert logged.data.metrics["final/federated/auc"] == pytest.approx(summary["federated"]["auc"])
    assert [a.path for a in client.list_artifacts(run_id)] == ["summary.json"]
    assert (copy / "mlartifacts").is_dir()
