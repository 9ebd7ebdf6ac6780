"""The report's figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import confusion_matrix, roc_curve  # noqa: E402

from simulations.report.runs import Run  # noqa: E402
from simulations.report.scoring import TestScores  # noqa: E402
from simulations.report.statistics import calibration_bins  # noqa: E402


@dataclass
class Figures:
    """Rendered figures: file stem -> (title, what it shows, PNG bytes)."""

    items: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)

    def add(self, stem: str, title: str, caption: str, fig: Figure) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.items[stem] = (title, caption, buffer.getvalue())


def _figure(ncols: int = 1, width: float = 6.0) -> tuple[Figure, Any]:
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols if ncols > 1 else width, 3.8))
    return fig, axes


def fig_test_curves(runs: list[Run], split: str = "test") -> Figure:
    """Test AUC and loss per round, one line per run (pooled/local as dashed levels for one);
    ``split = "val"``: the hospitals' combined validation metrics instead."""
    fig, (ax_auc, ax_loss) = _figure(2, 5.0)
    for run in runs:
        rows = run.test_rows.dropna(subset=[f"{split}_auc"])
        ax_auc.plot(rows["round"], rows[f"{split}_auc"], marker="o", label=run.name)
        ax_loss.plot(rows["round"], rows[f"{split}_loss"], marker="o", label=run.name)
    if split == "val":
        ax_auc.set(title="Combined validation AUC after each round", xlabel="round",
                   ylabel="ROC AUC, hospitals weighted by examples")
        ax_loss.set(title="Combined validation loss after each round", xlabel="round",
                    ylabel="cross-entropy (lower is better)")
        for ax in (ax_auc, ax_loss):
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
        fig.tight_layout()
        return fig
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


def _per_hospital(run: Run, panels: list[tuple[str, str, str]]) -> Figure:
    """One panel per ``(column, title, ylabel)`` of ``metrics.csv``: each hospital's value of
    the global model per round."""
    fig, axes = _figure(len(panels), 5.0)
    axes = list(axes) if len(panels) > 1 else [axes]
    rows = run.hospitals.dropna(subset=[panels[0][0]])
    many = rows.hospital.nunique() > 10
    for hospital, group in sorted(rows.groupby("hospital"), key=lambda g: int(g[0])
                                  if str(g[0]).isdigit() else 0):
        kwargs = {"linewidth": 0.8, "alpha": 0.5} if many else {"marker": "o"}
        for ax, (column, _, _) in zip(axes, panels, strict=True):
            ax.plot(group["round"], group[column], label=f"hospital {hospital}", **kwargs)
    for ax, (_, title, ylabel) in zip(axes, panels, strict=True):
        ax.set(title=title, xlabel="round", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if not many:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_hospital_validation(run: Run) -> Figure:
    """Each hospital's validation AUC and loss of the global model per round."""
    return _per_hospital(run, [
        ("val_auc", "Validation AUC at each hospital",
         "ROC AUC on the hospital's own held-out data"),
        ("val_loss", "Validation loss at each hospital", "cross-entropy (lower is better)")])


def fig_hospital_dice(run: Run) -> Figure:
    """Each hospital's validation Dice and HD95 (tight-box prompts) of the global adapter per
    round (a segmentation run)."""
    return _per_hospital(run, [
        ("val_dice", "Validation Dice at each hospital",
         "mean 3D Dice over the hospital's own validation cases"),
        ("val_hd95", "Validation HD95 at each hospital",
         "95% Hausdorff distance, mm (lower is better)")])


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


def fig_overlays(overlays: Path) -> Figure:
    """Test slices of a simulated segmentation run (``test-overlays.npz``): the image with the
    true structure's outline (green) and the published adapter's prediction (red)."""
    from scipy.ndimage import binary_erosion

    def outline(mask: np.ndarray) -> np.ndarray:
        mask = mask.astype(bool)
        return mask & ~binary_erosion(mask)

    with np.load(overlays) as data:
        count = len([k for k in data.files if k.startswith("image_")])
        fig, axes = _figure(count, 3.2)
        axes = list(np.atleast_1d(axes))
        for k, ax in enumerate(axes):
            image, truth, predicted = (data[f"{name}_{k}"] for name in
                                       ("image", "truth", "predicted"))
            rgb = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=2)
            rgb[outline(truth)] = (0.1, 0.9, 0.1)
            rgb[outline(predicted)] = (0.95, 0.1, 0.1)
            ax.imshow(rgb, interpolation="nearest")
            ax.set(title=f"test case {k + 1}", xticks=[], yticks=[])
    fig.tight_layout()
    return fig
