"""A study's report: one self-contained HTML file (figures inline) plus the figures as PNG files.

Reads run directories as ``server.records`` and ``simulations.runner`` write them
(``config.toml``, ``metrics.csv``, ``summary.json``, ``adapter/``), reloads the final adapter on
the base model and scores it on the run's test set (ROC, confusion matrix, calibration, a
bootstrap confidence interval for the AUC). Several runs get a comparison table and overlaid
curves. Metrics come from scikit-learn; figures from matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve  # noqa: E402

logger = logging.getLogger(__name__)

# MedMNIST's label names, so a clinician reads "pneumonia", not "class 1".
CLASS_NAMES = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal or benign"],
}
BOOTSTRAP_RESAMPLES = 1000
CALIBRATION_BINS = 10


class ReportError(ValueError):
    """A run directory that cannot be reported on (missing or unreadable files)."""


@dataclass
class Run:
    """One run directory, read.

    Attributes:
        path: the run directory.
        config: ``config.toml`` as a nested dict.
        metrics: ``metrics.csv`` (one row per round and hospital, plus ``global`` test rows).
        summary: ``summary.json``.
    """

    path: Path
    config: dict[str, Any]
    metrics: pd.DataFrame
    summary: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def hospitals(self) -> pd.DataFrame:
        return self.metrics[self.metrics.hospital != "global"]

    @property
    def test_rows(self) -> pd.DataFrame:
        return self.metrics[self.metrics.hospital == "global"].sort_values("round")


@dataclass
class TestScores:
    """The final global model on the run's test set.

    Attributes:
        labels: ``(N,)`` true classes.
        probs: ``(N, K)`` predicted class probabilities.
        auc: ROC AUC (binary: positive class; multi-class: one-vs-rest macro).
        auc_ci: 95% percentile bootstrap interval of the AUC (``BOOTSTRAP_RESAMPLES`` resamples).
        ece: expected calibration error of the top-class confidence, in [0, 1].
    """

    labels: np.ndarray
    probs: np.ndarray
    auc: float
    auc_ci: tuple[float, float]
    ece: float


@dataclass
class Figures:
    """Rendered figures: file stem -> (title, what it shows, PNG bytes)."""

    items: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)

    def add(self, stem: str, title: str, caption: str, fig: Figure) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.items[stem] = (title, caption, buffer.getvalue())


def load_run(path: Path) -> Run:
    """Read one run directory; a clear error names what is missing."""
    path = Path(path)
    needed = ("config.toml", "metrics.csv", "summary.json")
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise ReportError(f"{path}: not a finished run directory (missing {', '.join(missing)}); "
                          f"give the folder `medfed simulate` wrote (see --run-dir)")
    try:
        config = tomllib.loads((path / "config.toml").read_text())
        metrics = pd.read_csv(path / "metrics.csv", dtype={"hospital": str, "error": str})
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: cannot read the run ({err})") from err
    return Run(path=path, config=config, metrics=metrics, summary=summary)


def class_names(dataset: str, num_classes: int) -> list[str]:
    names = CLASS_NAMES.get(dataset, [])
    return names if len(names) == num_classes else [f"class {k}" for k in range(num_classes)]


def _auc(labels: np.ndarray, probs: np.ndarray) -> float:
    if len(np.unique(labels)) < 2:
        return math.nan
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    return float(roc_auc_score(labels, probs, multi_class="ovr", labels=range(probs.shape[1])))


def bootstrap_auc_ci(labels: np.ndarray, probs: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC: resample test examples with replacement.

    Resamples holding a single class (AUC undefined) are skipped.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        value = _auc(labels[idx], probs[idx])
        if math.isfinite(value):
            values.append(value)
    if not values:
        return (math.nan, math.nan)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def calibration_bins(labels: np.ndarray, probs: np.ndarray, bins: int = CALIBRATION_BINS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-class confidence vs accuracy in ``bins`` equal-width bins over [0, 1].

    Returns ``(mean confidence, accuracy, count)`` per bin (NaN where a bin is empty).
    """
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    which = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, confidence, bins) / count
        accuracy = np.bincount(which, correct, bins) / count
    return mean_conf, accuracy, count


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray,
                               bins: int = CALIBRATION_BINS) -> float:
    """ECE: the example-weighted mean gap between confidence and accuracy over bins."""
    mean_conf, accuracy, count = calibration_bins(labels, probs, bins)
    used = count > 0
    return float(np.sum(count[used] * np.abs(accuracy[used] - mean_conf[used])) / count.sum())


def _known_settings(obj: Any, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` without the settings this version of medfed does not know (a run written by
    an older or newer version), each one logged: the report needs the model and data only."""
    from dataclasses import fields, is_dataclass

    known = {f.name: getattr(obj, f.name) for f in fields(obj)}
    kept = {}
    for key, value in values.items():
        if key not in known:
            logger.warning("%s: config.toml setting '%s' is unknown here; ignored", where, key)
        elif is_dataclass(known[key]) and isinstance(value, dict):
            kept[key] = _known_settings(known[key], value, f"{where}.{key}")
        else:
            kept[key] = value
    return kept


def score_final_model(run: Run) -> TestScores:
    """Reload the run's final adapter on its base model and score it on the run's test set."""
    import torch
    from peft import PeftModel

    from models.metrics import predict
    from models.registry import build_base_model
    from simulations.config import ConfigError, SimulationConfig, with_overrides
    from simulations.sites import held_out_test_set

    if not (run.path / "adapter").is_dir():
        raise ReportError(f"{run.path}: no adapter/ folder; the run did not finish")
    try:
        config = with_overrides(SimulationConfig(), _known_settings(SimulationConfig(),
                                                                    run.config, run.name))
    except ConfigError as err:
        raise ReportError(f"{run.path}: config.toml does not load ({err})") from err
    model = PeftModel.from_pretrained(build_base_model(config.model), run.path / "adapter")
    test = held_out_test_set(config.data, config.model.image_size, config.seed)
    with torch.no_grad():
        probs = predict(model, test.images).softmax(dim=1).numpy()
    labels = test.labels.numpy()
    return TestScores(labels=labels, probs=probs, auc=_auc(labels, probs),
                      auc_ci=bootstrap_auc_ci(labels, probs, seed=config.seed),
                      ece=expected_calibration_error(labels, probs))


# ---------------------------------------------------------------- figures of one run


def _figure(ncols: int = 1, width: float = 6.0) -> tuple[Figure, Any]:
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols if ncols > 1 else width, 3.8))
    return fig, axes


def fig_test_curves(runs: list[Run]) -> Figure:
    """Test AUC and loss per round, one line per run (pooled/local as dashed levels for one)."""
    fig, (ax_auc, ax_loss) = _figure(2, 5.0)
    for run in runs:
        rows = run.test_rows
        ax_auc.plot(rows["round"], rows["test_auc"], marker="o", label=run.name)
        ax_loss.plot(rows["round"], rows["test_loss"], marker="o", label=run.name)
    if len(runs) == 1:
        for name, style in (("pooled", "--"), ("local", ":")):
            if name in runs[0].summary:
                ax_auc.axhline(runs[0].summary[name]["auc"], color="grey", linestyle=style,
                               label=f"{name} (final)")
    lowest = min([0.5] + [float(np.nanmin(r.test_rows["test_auc"])) for r in runs
                          if r.test_rows["test_auc"].notna().any()])
    ax_auc.set_ylim(max(0.0, lowest - 0.05), 1.0)
    ax_auc.set(title="Test AUC after each round", xlabel="round (0 = before training)",
               ylabel="ROC AUC (0.5 = chance, 1 = perfect)")
    ax_loss.set(title="Test loss after each round", xlabel="round (0 = before training)",
                ylabel="cross-entropy (lower is better)")
    for ax in (ax_auc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_auc.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_hospital_validation(run: Run) -> Figure:
    """Each hospital's validation AUC and loss of the global model per round."""
    fig, (ax_auc, ax_loss) = _figure(2, 5.0)
    rows = run.hospitals.dropna(subset=["val_auc"])
    many = rows.hospital.nunique() > 10
    for hospital, group in sorted(rows.groupby("hospital"), key=lambda g: int(g[0])
                                  if g[0].isdigit() else 0):
        kwargs = {"linewidth": 0.8, "alpha": 0.5} if many else {"marker": "o"}
        ax_auc.plot(group["round"], group["val_auc"], label=f"hospital {hospital}", **kwargs)
        ax_loss.plot(group["round"], group["val_loss"], label=f"hospital {hospital}", **kwargs)
    ax_auc.set(title="Validation AUC at each hospital", xlabel="round",
               ylabel="ROC AUC on the hospital's own held-out data")
    ax_loss.set(title="Validation loss at each hospital", xlabel="round",
                ylabel="cross-entropy (lower is better)")
    for ax in (ax_auc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if not many:
        ax_auc.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_baselines(run: Run, scores: TestScores | None) -> Figure:
    """Federated vs pooled vs each hospital alone: test AUC, accuracy and macro-F1."""
    fig, ax = _figure(1, 7.0)
    metrics = [("auc", "AUC"), ("accuracy", "accuracy"), ("macro_f1", "macro-F1")]
    setups = [n for n in ("federated", "pooled", "local") if n in run.summary]
    labels = {"federated": "federated", "pooled": "pooled (all data in one place)",
              "local": "each hospital alone (mean)"}
    width = 0.8 / len(setups)
    x = np.arange(len(metrics))
    for i, name in enumerate(setups):
        values = [run.summary[name].get(k, math.nan) for k, _ in metrics]
        bars = ax.bar(x + i * width, values, width, label=labels[name])
        # Values inside the bars: the whisker and the hospital dots sit on top.
        ax.bar_label(bars, fmt="%.2f", fontsize=8, label_type="center", color="white")
        if name == "federated" and scores is not None and all(map(math.isfinite, scores.auc_ci)):
            ax.errorbar(x[0] + i * width, values[0], color="black", capsize=4,
                        yerr=[[values[0] - scores.auc_ci[0]], [scores.auc_ci[1] - values[0]]])
        if name == "local":
            for hospital in run.summary["local"].get("per_hospital", []):
                ax.scatter(x + i * width, [hospital.get(k, math.nan) for k, _ in metrics],
                           color="black", s=8, zorder=3)
    ax.set_xticks(x + width * (len(setups) - 1) / 2, [label for _, label in metrics])
    ax.set(ylim=(0, 1.08), ylabel="score on the test set (higher is better)",
           title="Federated vs pooled vs each hospital alone")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def fig_roc(scores: TestScores, names: list[str]) -> Figure:
    fig, ax = _figure(1, 4.8)
    if scores.probs.shape[1] == 2:
        fpr, tpr, _ = roc_curve(scores.labels, scores.probs[:, 1])
        ax.plot(fpr, tpr, label=f"{names[1]} vs {names[0]} (AUC {scores.auc:.3f})")
    else:
        for k, name in enumerate(names):
            if 0 < (scores.labels == k).sum() < len(scores.labels):
                fpr, tpr, _ = roc_curve(scores.labels == k, scores.probs[:, k])
                ax.plot(fpr, tpr, linewidth=1, label=name)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="chance")
    ax.set(title="ROC curve of the final model (test set)",
           xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (sensitivity)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def fig_confusion(scores: TestScores, names: list[str]) -> Figure:
    from sklearn.metrics import ConfusionMatrixDisplay

    k = scores.probs.shape[1]
    matrix = confusion_matrix(scores.labels, scores.probs.argmax(axis=1), labels=range(k))
    fig, ax = plt.subplots(figsize=(max(4.2, 0.6 * k + 2), max(3.8, 0.6 * k + 1.5)))
    ConfusionMatrixDisplay(matrix, display_labels=names).plot(ax=ax, colorbar=False,
                                                              cmap="Blues", values_format="d")
    ax.set(title="Confusion matrix (test images)", xlabel="model's prediction",
           ylabel="true diagnosis")
    fig.tight_layout()
    return fig


def fig_calibration(scores: TestScores) -> Figure:
    mean_conf, accuracy, count = calibration_bins(scores.labels, scores.probs)
    fig, ax = _figure(1, 4.8)
    used = count > 0
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    ax.plot(mean_conf[used], accuracy[used], marker="o", label=f"model (ECE {scores.ece:.3f})")
    for x, y, n in zip(mean_conf[used], accuracy[used], count[used], strict=True):
        ax.annotate(f"{int(n)}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    # The top class's probability is never below 1/K (0.5 for two classes).
    floor = 1.0 / scores.probs.shape[1]
    ax.set(title="Reliability: stated confidence vs how often right",
           xlabel="model's confidence in its prediction", ylabel="share of predictions correct",
           xlim=(floor - 0.02, 1.0), ylim=(0, 1.02))
    ax.legend(fontsize=8, loc="lower right", title="numbers: test images per bin",
              title_fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def fig_epsilon(run: Run) -> Figure:
    fig, ax = _figure(1, 6.0)
    rows = run.hospitals.dropna(subset=["epsilon"])
    for hospital, group in rows.groupby("hospital"):
        ax.plot(group["round"], group["epsilon"], marker="o", label=f"hospital {hospital}")
    delta = rows["delta"].dropna()
    target = run.config.get("privacy", {}).get("dp_target_epsilon") or 0.0
    if target > 0:
        ax.axhline(target, color="firebrick", linestyle="--", label=f"run's budget ({target:g})")
    ax.set_ylim(0, max(target, float(rows["epsilon"].max())) * 1.15)
    ax.set(title="Privacy spent at each hospital (differential privacy)", xlabel="round",
           ylabel="epsilon spent so far (lower = more private)"
                  + (f"\n(delta = {delta.iloc[0]:g})" if len(delta) else ""))
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if rows.hospital.nunique() <= 10:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_bytes(runs: list[Run]) -> Figure:
    fig, ax = _figure(1, 6.0)
    for run in runs:
        per_round = run.hospitals.groupby("round")["upload_bytes"].sum() / 1e6
        per_round = per_round[per_round > 0]
        ax.plot(per_round.index, per_round.values, marker="o", label=run.name)
    ax.set(title="Data sent to the coordinator per round", xlabel="round",
           ylabel="megabytes uploaded (all hospitals)", ylim=(0, None))
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- text and HTML


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _setting(run: Run, section: str, key: str) -> Any:
    return run.config.get(section, {}).get(key)


def _plural(count: Any, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def study_line(run: Run) -> str:
    """One sentence describing the study a run simulated."""
    data = run.config.get("data", {})
    partition = data.get("partition", "?")
    if partition == "dirichlet":
        partition = f"label skew (Dirichlet alpha {data.get('alpha')})"
    extras = []
    if partition == "quantity":
        partition = (f"quantity skew ({data.get('size_distribution')} sizes, skew "
                     f"{data.get('size_skew')})")
    if data.get("shift") not in (None, "", "none"):
        extras.append(f"scanner shift '{data['shift']}' (strength {data.get('shift_strength')})")
    dropout = run.config.get("failures", {}).get("dropout_probability")
    if dropout:
        extras.append(f"each hospital drops out of a round with probability {dropout:g}")
    fraction = _setting(run, "federation", "fraction_train")
    if fraction is not None and fraction < 1:
        extras.append(f"{fraction:.0%} of hospitals train each round")
    privacy = run.config.get("privacy", {})
    if privacy.get("dpsgd") or privacy.get("update_noise_multiplier"):
        extras.append("differential privacy on")
    model = run.config.get("model", {})
    return (f"{data.get('num_hospitals')} hospitals, {data.get('dataset')}, {partition}; "
            f"{_plural(_setting(run, 'federation', 'rounds'), 'round')} of "
            f"{_setting(run, 'federation', 'strategy')}; {model.get('backbone')} at "
            f"{model.get('image_size')} px, LoRA rank {model.get('lora_r')}; seed "
            f"{run.config.get('seed')}" + ("; " + ", ".join(extras) if extras else ""))


def failures_table(run: Run) -> str:
    rows = run.hospitals.dropna(subset=["error"])
    if rows.empty:
        return "<p>Every hospital answered every round.</p>"
    body = "".join(f"<tr><td>{int(r['round'])}</td><td>{html.escape(str(r['hospital']))}</td>"
                   f"<td>{html.escape(str(r['error']))}</td></tr>" for _, r in rows.iterrows())
    return ("<p>Replies the coordinator did not use (the round went on with the others):</p>"
            "<table><tr><th>round</th><th>hospital</th><th>reason</th></tr>" + body + "</table>")


def hospital_table(run: Run) -> str:
    """Per hospital: training images, last validation scores, rounds failed or late (issue 8),
    training alone."""
    sizes = run.summary.get("examples_per_hospital", [])
    alone = run.summary.get("local", {}).get("per_hospital", [])
    rows = []
    hospitals = run.hospitals
    for k in range(len(sizes)):
        mine = hospitals[hospitals.hospital == str(k)]
        errors = mine["error"]
        late = errors.fillna("").str.contains(": late: ", regex=False)
        val = mine.dropna(subset=["val_auc"]).sort_values("round")
        last = val.iloc[-1] if len(val) else None
        rows.append({
            "hospital": k,
            "training images": sizes[k],
            "validation AUC (last round)": None if last is None else last["val_auc"],
            "validation accuracy (last round)": None if last is None else last["val_accuracy"],
            "test AUC trained alone": alone[k]["auc"] if k < len(alone) else None,
            "rounds failed": int((errors.notna() & ~late).sum()),
            # Issue 8: stragglers past the round timeout are late, not failed.
            "rounds late": int(late.sum()) or None,
        })
    if not rows:
        return ""
    # Leave out columns with nothing in them (no local baseline, no validation replies).
    empty = [k for k in rows[0] if all(r[k] is None for r in rows)]
    rows = [{k: v for k, v in r.items() if k not in empty} for r in rows]
    return "<h3>Hospitals</h3>" + _table(rows)


def _threshold_line(scores: TestScores, names: list[str]) -> str:
    """Binary: sensitivity and specificity at the most-probable-class decision."""
    if scores.probs.shape[1] != 2:
        return ""
    tn, fp, fn, tp = confusion_matrix(scores.labels, scores.probs.argmax(axis=1),
                                      labels=[0, 1]).ravel()
    sens = tp / (tp + fn) if tp + fn else math.nan
    spec = tn / (tn + fp) if tn + fp else math.nan
    return (f"<p>Deciding '{html.escape(names[1])}' when the model gives it over 50%: "
            f"sensitivity {_fmt(sens)} ({tp} of {tp + fn} {html.escape(names[1])} images found), "
            f"specificity {_fmt(spec)} ({tn} of {tn + fp} {html.escape(names[0])} images "
            f"cleared). Expected calibration error {scores.ece:.3f}.</p>")


def comparison_rows(runs: list[Run], scores: dict[str, TestScores | None],
                    names: list[str]) -> list[dict]:
    """One row per run for the comparison table (also written as ``comparison.csv``)."""
    rows = []
    differs = differing_settings(runs) if len(runs) > 1 else [""] * len(runs)
    for run, name, differ in zip(runs, names, differs, strict=True):
        s = run.summary
        sc = scores.get(name)
        row = {
            "run": name,
            "settings that differ": differ,
            "hospitals": s.get("hospitals"),
            "partition": run.config.get("data", {}).get("partition"),
            "rounds": s.get("rounds"),
            "federated AUC": s.get("federated", {}).get("auc"),
            "AUC 95% CI": (f"{sc.auc_ci[0]:.3f}-{sc.auc_ci[1]:.3f}" if sc else None),
            "pooled AUC": s.get("pooled", {}).get("auc"),
            "local AUC (mean)": s.get("local", {}).get("auc"),
            "ECE": sc.ece if sc else None,
            "max epsilon": s.get("privacy", {}).get("epsilon_max"),
            "MB per hospital per round": s.get("bytes", {}).get(
                "upload_per_hospital_per_round", 0) / 1e6,
            "federated wall time (s)": s.get("wall_time_s", {}).get("federated"),
        }
        rows.append(row)
    return rows


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_settings(runs: list[Run]) -> list[str]:
    """Per run, ``key=value`` for each setting that is not the same in every run (e.g. the
    swept ones); the run directory itself is left out."""
    flats = [_flat(run.config) for run in runs]
    keys = sorted(set().union(*flats) - {"run_dir"})
    differ = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]
    return [", ".join(f"{k.split('.')[-1]}={f.get(k)}" for k in differ) for f in flats]


def _table(rows: list[dict]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row.values()) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure_html(stem: str, figures: Figures) -> str:
    title, caption, png = figures.items[stem]
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="{stem}"><h3>{html.escape(title)}</h3>'
            f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>What this shows:</b> {html.escape(caption)}</figcaption></figure>")


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #1f77b4;padding-bottom:.2em}h2{margin-top:2em;color:#1f4e79}
h3{margin:.2em 0;font-size:1.05em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#eef3f8}
td:first-child,th:first-child{text-align:left}
figure{margin:1.2em 0;padding:.8em;border:1px solid #e3e3e3;border-radius:6px;background:#fcfcfc}
img{max-width:100%}figcaption{font-size:.92em;color:#444;margin-top:.4em}
.key{font-size:1.1em;background:#f3f8ee;border-left:4px solid #2ca02c;padding:.6em 1em}
"""


def _key_finding(run: Run, scores: TestScores | None) -> str:
    fed = run.summary.get("federated", {})
    parts = [f"The federated model reached a test AUC of <b>{_fmt(fed.get('auc'))}</b>"]
    if scores is not None and all(map(math.isfinite, scores.auc_ci)):
        parts.append(f" (95% CI {scores.auc_ci[0]:.3f} to {scores.auc_ci[1]:.3f}, "
                     f"{len(scores.labels)} test images)")
    if "pooled" in run.summary:
        pooled = run.summary["pooled"]
        private = (f" (under DP-SGD at epsilon {pooled['dp_epsilon']:.2f}, as each hospital)"
                   if "dp_epsilon" in pooled else "")
        parts.append(f"; pooling all data in one place{private} gave {_fmt(pooled['auc'])}")
    if "local" in run.summary:
        parts.append(f"; a hospital training alone gave {_fmt(run.summary['local']['auc'])} "
                     "on average")
    return "<p class='key'>" + "".join(parts) + ".</p>"


def run_figures(run: Run, scores: TestScores | None, figures: Figures, prefix: str) -> list[str]:
    """Render one run's figures into ``figures``; return their stems in report order."""
    stems = []

    def add(stem: str, title: str, caption: str, fig: Figure) -> None:
        figures.add(prefix + stem, title, caption, fig)
        stems.append(prefix + stem)

    baselines = [n for n in ("pooled", "local") if n in run.summary]
    add("test-curves", "Test AUC and loss per round",
        "how well the shared model separates the classes on held-out test images after each "
        "round of federated training (round 0: the starting model)"
        + ("; dashed/dotted lines are the pooled and single-hospital results after the same "
           "training." if baselines else "."), fig_test_curves([run]))
    if run.hospitals["val_auc"].notna().any():
        add("hospital-validation", "Validation metrics at each hospital",
            "the shared model scored on each hospital's own held-out images; hospitals whose "
            "lines sit apart have data the model serves less well.", fig_hospital_validation(run))
    add("baselines", "Federated vs pooled vs local",
        "test scores of the same model trained three ways: federated, on all data pooled "
        "(usually not allowed, the upper reference), and by each hospital alone (dots: each "
        "hospital; bar: their mean). Black whisker: 95% bootstrap interval of the federated AUC.",
        fig_baselines(run, scores))
    if scores is not None:
        names = class_names(str(run.config.get("data", {}).get("dataset")),
                            scores.probs.shape[1])
        add("roc", "ROC curve of the final model",
            "the trade-off between sensitivity and false alarms over all decision thresholds; "
            "the closer to the top-left corner, the better.", fig_roc(scores, names))
        add("confusion", "Confusion matrix of the final model",
            "how many test images of each true class the model assigned to each class (at the "
            "most probable class); the diagonal holds the correct ones.",
            fig_confusion(scores, names))
        add("calibration", "Calibration (reliability diagram)",
            "whether the model's confidence can be taken at face value: points on the diagonal "
            "mean that of predictions made with 80% confidence, 80% are right. ECE is the "
            "average gap (0 = perfectly calibrated).", fig_calibration(scores))
    if "epsilon" in run.hospitals and run.hospitals["epsilon"].notna().any():
        add("epsilon", "Privacy budget spent per hospital",
            "the differential-privacy epsilon each hospital has spent in this run after each "
            "round; it only grows, and a smaller value means a stronger privacy guarantee.",
            fig_epsilon(run))
    add("bytes", "Communication per round",
        "megabytes of adapter updates the hospitals sent to the coordinator in each round "
        "(the backbone never travels).", fig_bytes([run]))
    return stems


def build_report(run_dirs: list[Path], out_dir: Path, score_model: bool = True) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/figures/*.png``.

    ``score_model`` reloads each run's adapter to draw ROC, confusion matrix and calibration
    (needs the dataset and base weights); without it those figures are left out.
    """
    runs = [load_run(Path(p)) for p in run_dirs]
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        # Same folder name in two places: prefix the parent so figures don't overwrite.
        for run in runs:
            run.path = run.path.resolve()
        names = [f"{run.path.parent.name}-{run.name}" for run in runs]
    figures = Figures()
    scores: dict[str, TestScores | None] = {}
    sections = []
    for run, name in zip(runs, names, strict=True):
        score = score_final_model(run) if score_model else None
        scores[name] = score
        prefix = f"{name}-" if len(runs) > 1 else ""
        stems = run_figures(run, score, figures, prefix)
        ece = ""
        if score is not None:
            ece = _threshold_line(score, class_names(
                str(run.config.get("data", {}).get("dataset")), score.probs.shape[1]))
            if score.probs.shape[1] != 2:
                ece = f"<p>Expected calibration error {score.ece:.3f}.</p>"
        sections.append(
            f"<section><h2>Run {html.escape(name)}</h2><p>{html.escape(study_line(run))}.</p>"
            + _key_finding(run, score) + ece + hospital_table(run) + failures_table(run)
            + "".join(_figure_html(s, figures) for s in stems) + "</section>")
    comparison = ""
    rows = comparison_rows(runs, scores, names)
    if len(runs) > 1:
        figures.add("compare-test-curves", "Test AUC and loss per round, all runs",
                    "the runs' global models on the test set after each round, overlaid.",
                    fig_test_curves(runs))
        figures.add("compare-bytes", "Communication per round, all runs",
                    "megabytes uploaded by all hospitals in each round, per run.",
                    fig_bytes(runs))
        comparison = ("<section><h2>Comparison</h2>" + _table(rows)
                      + _figure_html("compare-test-curves", figures)
                      + _figure_html("compare-bytes", figures) + "</section>")
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    for stem, (_, _, png) in figures.items.items():
        (out_dir / "figures" / f"{stem}.png").write_bytes(png)
    pd.DataFrame(rows).to_csv(out_dir / "comparison.csv", index=False)
    title = (f"medfed study report: {names[0]}" if len(runs) == 1
             else f"medfed study report: {len(runs)} runs")
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>Generated {datetime.now():%Y-%m-%d %H:%M} from "
            f"{', '.join(html.escape(str(r.path)) for r in runs)}. AUC: area under the ROC "
            f"curve, 0.5 is chance and 1 is perfect; the test set is held out from every "
            f"hospital.</p>" + comparison + "".join(sections) + "</body></html>")
    path = out_dir / "report.html"
    path.write_text(page)
    logger.info("report written to %s", path)
    return path


def default_out_dir(run_dirs: list[Path]) -> Path:
    """One run: ``<run>/report``; several: ``reports/compare-<time>``."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "report"
    return Path("reports") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
