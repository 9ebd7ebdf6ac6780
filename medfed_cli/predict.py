"""``medfed predict``: run a published adapter on a hospital's DICOM studies, offline.

Checks every pin of the adapter first (``inference.published``), prints its card, then writes
one prediction per study (and, for a labelled manifest, the external validation's metrics).
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from medfed_cli.common import UsageError, console

if TYPE_CHECKING:
    from inference.published import Published


def _print_card(published: Published) -> None:
    """The card, as a hospital reads it before trusting the adapter."""
    from rich.table import Table

    card = published.card
    table = Table(title=f"adapter card: {published.folder}", show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    privacy = card.privacy
    rows = [
        ("study", f"{card.study} (declared task: {card.declared_task or '-'})"),
        ("task / classes", f"{card.task}: {', '.join(card.classes)}"),
        ("base model", f"{card.model.backbone} (weights {card.model.weights_sha256[:16]}...)"),
        ("preprocessing", f"{card.preprocessing.image_size} px, {card.preprocessing.frames} "
                          f"frame, {card.preprocessing.channels} channels"),
        ("federation", f"{card.hospitals} hospitals, {card.rounds} rounds, {card.strategy}, "
                       f"round {card.published_round} published; secure aggregation "
                       f"{'on' if card.secure_aggregation else 'off'}"),
        ("validation", ", ".join(f"{k} {v:.4g}" for k, v in card.validation.items())),
        ("decision", f"{card.decision.rule}; prior {card.decision.prior or 'equal'}"),
        ("privacy", f"DP-SGD {'on' if privacy.dpsgd else 'off'}, update DP "
                    f"{'on' if privacy.update_dp else 'off'}, largest epsilon "
                    f"{privacy.epsilon_max if privacy.epsilon_max is not None else '-'}"),
        ("code", f"medfed {card.medfed_version}, commit {card.code_commit[:12]}"),
        ("adapter sha256", card.adapter_files.get("adapter_model.safetensors", "")),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def cmd_predict(args: argparse.Namespace) -> int:
    """Check the adapter's pins, print its card, predict, and write the reports."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from inference.predict import predict_studies, reader_settings, write_reports
    from inference.published import load_published
    from inference.studies import folder_studies, manifest_studies

    if (args.manifest is None) == (args.input is None):
        raise UsageError("give either --manifest CSV or --input FOLDER")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    published = load_published(args.adapter, args.device)
    _print_card(published)
    if args.manifest is not None:
        source = manifest_studies(args.manifest, reader_settings(published))
    else:
        source = folder_studies(args.input)
    out = args.out or Path("predictions") / f"{published.card.study}-{datetime.now():%Y%m%d-%H%M%S}"
    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, disable=args.no_progress) as bar:
        task = bar.add_task("predicting", total=len(source.studies))
        outcome = predict_studies(published, source, out, args.batch_size,
                                  lambda n: bar.advance(task, n))
    summary = write_reports(published, source, outcome, out)
    console.print(f"{outcome.predicted} of {outcome.studies} studies predicted on "
                  f"{published.device} ({summary['studies_per_second']} per second); "
                  f"not readable: {dict(outcome.failed) or 'none'}")
    if metrics := summary.get("external_validation"):
        console.print(
            "external validation: " + ", ".join(
                f"{k} {metrics[k]:.4f}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
                for k in ("studies", "auc", "accuracy", "majority_class_rate",
                          "balanced_accuracy", "brier", "ece") if metrics.get(k) is not None))
    console.print(f"predictions: {out}")
    return 0


def add_predict(sub: argparse._SubParsersAction) -> None:
    """``medfed predict`` and its flags."""
    cmd = sub.add_parser(
        "predict", help="run a published adapter on DICOM studies (offline); a labelled "
                        "manifest also scores it (external validation)")
    cmd.add_argument("adapter", type=Path, metavar="RUN_OR_ADAPTER",
                     help="a run directory or its adapter/ folder (with card.json)")
    cmd.add_argument("--manifest", type=Path, metavar="CSV",
                     help="CSV with a 'path' column (relative to it); with 'label' and "
                          "'patient_id' columns too, the adapter is also scored")
    cmd.add_argument("--input", type=Path, metavar="FOLDER",
                     help="folder of DICOM files: each file is one study")
    cmd.add_argument("--out", type=Path, metavar="DIR",
                     help="output folder (default predictions/<study>-<time>)")
    cmd.add_argument("--batch-size", type=int, default=64,
                     help="studies read and predicted at a time (bounds memory; default 64)")
    cmd.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="auto: CUDA when present, else CPU")
    cmd.add_argument("--threads", type=int, default=0,
                     help="CPU threads for the model (default: torch's, one per core; on a "
                          "machine other jobs share, 1 can be several times faster)")
    cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    cmd.set_defaults(func=cmd_predict)
