"""The report page: a self-contained HTML file with the figures inline, and PNG copies."""

from __future__ import annotations

import base64
import html
import logging
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from sklearn.metrics import confusion_matrix

from simulations.report.figures import (
    Figure,
    Figures,
    fig_baselines,
    fig_bytes,
    fig_calibration,
    fig_confusion,
    fig_epsilon,
    fig_hospital_dice,
    fig_hospital_validation,
    fig_overlays,
    fig_roc,
    fig_test_curves,
)
from simulations.report.runs import (
    OVERLAY_FILE,
    Run,
    is_simulation,
    load_run,
    run_class_names,
)
from simulations.report.scoring import TestScores, score_final_model

logger = logging.getLogger(__name__)


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
    """One sentence describing the study a run simulated (or ran on real hospitals)."""
    if not is_simulation(run):
        model = run.config.get("model", {})
        return (f"{run.summary.get('hospitals')} hospitals with their own data, classes "
                f"{', '.join(run.config.get('classes', [])) or '(indices)'}; "
                f"{_plural(_setting(run, 'federation', 'rounds'), 'round')} of "
                f"{_setting(run, 'federation', 'strategy')}; {model.get('backbone')} at "
                f"{model.get('image_size')} px, LoRA rank {model.get('lora_r')}"
                + safeguards(run))
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


def safeguards(run: Run) -> str:
    """What a run's summary says of secure aggregation and differential privacy (empty for a
    run recorded before summaries held it)."""
    secagg = run.summary.get("secure_aggregation")
    if secagg is None:
        return ""
    settings = run.summary.get("privacy_settings", {})
    dp = settings.get("dpsgd") or settings.get("update_noise_multiplier")
    text = f"; secure aggregation {'on' if secagg.get('enabled') else 'off'}"
    text += "; differential privacy " + ("on" if dp else "off")
    privacy = run.summary.get("privacy", {})
    if privacy.get("epsilon_max") is not None:
        text += f" (largest epsilon at a hospital {privacy['epsilon_max']:.3g}"
        if privacy.get("target_epsilon"):
            over = ", above the study's target" if privacy.get("target_exceeded") else ""
            text += f", target {privacy['target_epsilon']:g}{over}"
        text += ")"
    skipped = sorted({str(n["hospital"]) for n in run.summary.get("not_evaluated", [])})
    if skipped:
        text += f"; did not evaluate: {', '.join(skipped)}"
    return text


def failures_table(run: Run) -> str:
    rows = run.hospitals.dropna(subset=["error"])
    if rows.empty:
        return "<p>Every hospital answered every round.</p>"
    body = "".join(f"<tr><td>{int(r['round'])}</td><td>{html.escape(str(r['hospital']))}</td>"
                   f"<td>{html.escape(str(r['error']))}</td></tr>" for _, r in rows.iterrows())
    return ("<p>Replies the coordinator did not use (the round went on with the others):</p>"
            "<table><tr><th>round</th><th>hospital</th><th>reason</th></tr>" + body + "</table>")


def hospital_table(run: Run) -> str:
    """Per hospital: training images, last validation scores, rounds failed or late,
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
            # Stragglers past the round timeout are late, not failed.
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
            "federated balanced accuracy": s.get("federated", {}).get("balanced_accuracy"),
            "published round": s.get("published", {}).get("round"),
            "validation AUC (combined)": s.get("validation", {}).get("auc"),
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


def held_out_sentence(runs: list[Run]) -> str:
    """What the report says of the runs' test sets, true to the runs: a test set is named only
    where a run was scored on one (``federated`` in its summary)."""
    held = [run for run in runs if "federated" in run.summary]
    if len(held) == len(runs):
        return "the test set is held out from every hospital."
    if not held:
        return ("there is no test set: every figure is the hospitals' combined results on "
                "their own validation splits.")
    return ("runs with a test set hold it out from every hospital; the others are judged on "
            "the hospitals' own validation splits only.")


def _key_finding(run: Run, scores: TestScores | None) -> str:
    published = run.summary.get("published", {})
    val = run.summary.get("validation", {})
    chosen = (f"<p>Published: the global adapter of round {published['round']} "
              f"({html.escape(published['rule'])}); combined validation AUC "
              f"{_fmt(val.get('auc'))}, accuracy {_fmt(val.get('accuracy'))}, balanced accuracy "
              f"{_fmt(val.get('balanced_accuracy'))} over {_fmt(val.get('examples'))} held-out "
              f"images at the hospitals.</p>") if published else ""
    if "federated" not in run.summary:  # a deployed run without a test set of its own
        return chosen
    fed = run.summary.get("federated", {})
    parts = [f"The federated model reached a test AUC of <b>{_fmt(fed.get('auc'))}</b> "
             f"(accuracy {_fmt(fed.get('accuracy'))}, balanced accuracy "
             f"{_fmt(fed.get('balanced_accuracy'))})"]
    if held := run.summary.get("test_set"):  # a deployed run's coordinator-held test set
        parts.append(f" on the coordinator's own test set ({held.get('usable_rows')} of "
                     f"{held.get('rows')} rows of {html.escape(str(held.get('manifest')))}, "
                     f"read as the hospitals read theirs)")
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
        if best := run.summary["local"].get("best_hospital"):
            parts.append(f", and the best single hospital (chosen on validation data: hospital "
                         f"{best['hospital']}, {best['train_examples']} training images) "
                         f"{_fmt(best.get('auc'))}")
    return "<p class='key'>" + "".join(parts) + ".</p>" + chosen + decision_paragraph(run)


def decision_paragraph(run: Run) -> str:
    """The published rule's prior, its accuracy beside always answering the commonest test
    class, and its recall per class ("" without those figures)."""
    decision = run.summary.get("decision") or {}
    if not decision.get("recall_per_class"):
        return ""
    prior = run.summary.get("published", {}).get("prior", "")
    recall = decision["recall_per_class"]
    names = run_class_names(run, len(recall))
    fed = run.summary.get("federated", {})
    return (f"<p>Decision rule: {html.escape(str(prior))}. Its test accuracy "
            f"{_fmt(fed.get('accuracy'))} compares with {_fmt(decision['majority_rate'])} for "
            f"always answering the commonest class; recall per class: "
            + ", ".join(f"{html.escape(str(n))} {_fmt(r)}" for n, r in zip(names, recall,
                                                                         strict=True))
            + ".</p>")


def run_figures(run: Run, scores: TestScores | None, figures: Figures, prefix: str) -> list[str]:
    """Render one run's figures into ``figures``; return their stems in report order."""
    stems = []

    def add(stem: str, title: str, caption: str, fig: Figure) -> None:
        figures.add(prefix + stem, title, caption, fig)
        stems.append(prefix + stem)

    baselines = [n for n in ("pooled", "local") if n in run.summary]
    if run.test_rows["test_auc"].notna().any():
        add("test-curves", "Test AUC and loss per round",
            "how well the shared model separates the classes on held-out test images after "
            "each round of federated training (round 0: the starting model)"
            + ("; dashed/dotted lines are the pooled and single-hospital results after the "
               "same training." if baselines else "."), fig_test_curves([run]))
    if run.test_rows["val_auc"].notna().any():
        add("validation-curves", "Combined validation AUC and loss per round",
            "the shared model scored by every hospital on its own held-out images after each "
            "round, combined weighted by their numbers of images; the run publishes the "
            "round where the combined metric is highest.", fig_test_curves([run], "val"))
    if run.hospitals["val_auc"].notna().any():
        add("hospital-validation", "Validation metrics at each hospital",
            "the shared model scored on each hospital's own held-out images; hospitals whose "
            "lines sit apart have data the model serves less well.", fig_hospital_validation(run))
    if "val_dice" in run.hospitals and run.hospitals["val_dice"].notna().any():
        add("hospital-dice", "Validation Dice and HD95 at each hospital",
            "the shared segmentation adapter scored by each hospital on its own validation "
            "cases after each round (box prompts around the true structure); the run publishes "
            "the round with the highest combined Dice.", fig_hospital_dice(run))
    if (run.path / OVERLAY_FILE).is_file():
        add("overlays", "Test slices: true and predicted outlines",
            "the middle chosen slice of a few held-out test cases (a simulation's; a deployed "
            "coordinator holds no image): the true structure outlined in green, the published "
            "adapter's prediction (box prompt) in red.", fig_overlays(run.path / OVERLAY_FILE))
    if "federated" in run.summary and "auc" in run.summary["federated"]:
        add("baselines", "Federated vs pooled vs local",
            "test scores of the same model trained three ways: federated, on all data pooled "
            "(usually not allowed, the upper reference), and by each hospital alone (dots: "
            "each hospital; bar: their mean). Black whisker: 95% bootstrap interval of the "
            "federated AUC.", fig_baselines(run, scores))
    if scores is not None:
        names = run_class_names(run, scores.probs.shape[1])
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
        # A deployed run is reported from its own files: nothing is re-scored on MedMNIST; nor
        # is a segmentation run (its summary holds its test Dice and HD95 already).
        segmentation = run.summary.get("task_type") == "segmentation"
        score = (score_final_model(run) if score_model and is_simulation(run)
                 and not segmentation else None)
        scores[name] = score
        prefix = f"{name}-" if len(runs) > 1 else ""
        stems = run_figures(run, score, figures, prefix)
        ece = ""
        if score is not None:
            ece = _threshold_line(score, run_class_names(run, score.probs.shape[1]))
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
            f"curve, 0.5 is chance and 1 is perfect; {held_out_sentence(runs)}</p>"
            + comparison + "".join(sections) + "</body></html>")
    path = out_dir / "report.html"
    path.write_text(page)
    logger.info("report written to %s", path)
    return path


def default_out_dir(run_dirs: list[Path]) -> Path:
    """One run: ``<run>/report``; several: ``reports/compare-<time>``."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "report"
    return Path("reports") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
