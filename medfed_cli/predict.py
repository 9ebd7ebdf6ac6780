"""``medfed predict``: run a published adapter on a hospital's studies, offline.

Checks every pin of the adapter first (``inference.published``), prints its card, then writes
one prediction per study (and, for a labelled manifest, the external validation's metrics):
class probabilities for a classification adapter (``inference.predict``), a mask per study as
NIfTI and, for a DICOM series, DICOM SEG for a segmentation adapter (``inference.segment``).
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from medfed_cli.common import UsageError, console

if TYPE_CHECKING:
    from rich.progress import Progress

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
    out = args.out or Path("predictions") / f"{published.card.study}-{datetime.now():%Y%m%d-%H%M%S}"
    if published.card.task == "segmentation":
        return _segment(args, published, out)
    if args.manifest is not None:
        source = manifest_studies(args.manifest, reader_settings(published))
    else:
        source = folder_studies(args.input)
    with _progress(args) as bar:
        task = bar.add_task("predicting", total=len(source.studies))
        outcome = predict_studies(published, source, out, args.batch_size or 64,
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


def _progress(args: argparse.Namespace) -> Progress:
    """The progress bar (studies done of all, time left)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    return Progress(*columns, console=console, disable=args.no_progress)


def _segment(args: argparse.Namespace, published: Published, out: Path) -> int:
    """A segmentation adapter: a mask per study (NIfTI; DICOM SEG for a series), and Dice and
    HD95 when the manifest has a mask column."""
    from imaging.settings import ReadSettings
    from inference.seg_studies import folder_segmentation_studies, manifest_segmentation_studies
    from inference.segment import segment_studies, write_segmentation_summary

    if args.manifest is not None:
        source = manifest_segmentation_studies(
            args.manifest, ReadSettings().resolved_roots(args.manifest))
    else:
        source = folder_segmentation_studies(args.input)
    with _progress(args) as bar:
        task = bar.add_task("segmenting", total=len(source.studies))
        outcome = segment_studies(published, source, out, args.batch_size or 8, args.cache,
                                  lambda n: bar.advance(task, n))
    summary = write_segmentation_summary(published, source, outcome, out)
    console.print(f"{outcome.segmented} of {outcome.studies} studies segmented "
                  f"({outcome.slices} slices) on {published.device}, whole-slice box prompts "
                  f"({summary['studies_per_second']} studies per second); not readable: "
                  f"{dict(outcome.failed) or 'none'}")
    if metrics := summary.get("external_validation"):
        dice, hd95 = metrics["mean_dice"], metrics["mean_hd95_mm"]
        console.print(f"external validation: {metrics['studies_scored']} studies scored, "
                      f"mean dice {'-' if dice is None else f'{dice:.4f}'}, mean hd95 "
                      f"{'-' if hd95 is None else f'{hd95:.2f} mm'}")
    console.print(f"predictions: {out}")
    return 0


def add_predict(sub: argparse._SubParsersAction) -> None:
    """``medfed predict`` and its flags."""
    cmd = sub.add_parser(
        "predict", help="run a published adapter on studies (offline): classes for DICOM "
                        "files, masks for NIfTI volumes and DICOM series; a labelled manifest "
                        "also scores it (external validation)")
    cmd.add_argument("adapter", type=Path, metavar="RUN_OR_ADAPTER",
                     help="a run directory or its adapter/ folder (with card.json)")
    cmd.add_argument("--manifest", type=Path, metavar="CSV",
                     help="classification: CSV with a 'path' column (relative to it); with "
                          "'label' and 'patient_id' columns too, the adapter is also scored. "
                          "Segmentation: an 'image' column (NIfTI file or DICOM series "
                          "folder); with a 'mask' column (NIfTI), Dice and HD95 per study")
    cmd.add_argument("--input", type=Path, metavar="FOLDER",
                     help="classification: folder of DICOM files, each file one study; "
                          "segmentation: folder of NIfTI files and DICOM series folders")
    cmd.add_argument("--out", type=Path, metavar="DIR",
                     help="output folder (default predictions/<study>-<time>)")
    cmd.add_argument("--batch-size", type=int, default=0,
                     help="classification: studies read and predicted at a time (default "
                          "64); segmentation: slices through the encoder at a time, one study "
                          "at a time (default 8); both bound memory")
    cmd.add_argument("--cache", type=Path, metavar="DIR",
                     help="segmentation: keep each slice's image embedding here (4 MiB a "
                          "slice, derived from patient images: a folder inside the hospital's "
                          "data area); a rerun on the same studies skips the encoder")
    cmd.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="auto: CUDA when present, else CPU")
    cmd.add_argument("--threads", type=int, default=0,
                     help="CPU threads for the model (default: torch's, one per core; on a "
                          "machine other jobs share, 1 can be several times faster)")
    cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    cmd.set_defaults(func=cmd_predict)
