"""``python -m simulations.bench predict``: ``medfed predict``'s speed, memory, pins and an
external AUC.

1. Trains a quick federation in process (the in-process equivalent of ``medfed simulate
   --rounds 2 --max-train-examples 500 --no-baselines``: 5 hospitals, Dirichlet label skew
   0.5, 48 px, seed 0, hospitals drawn from PneumoniaMNIST's *train* split) and publishes its
   adapter with its card.
2. Writes ``--studies`` DICOM files (default 10,000) made from PneumoniaMNIST's *test* split
   (its 624 images at their native 28 px, cycled; fresh UIDs per file) in a temporary folder,
   and runs the prediction over the folder in a fresh process, which reports its speed and
   its own peak resident memory (``VmHWM``).
3. Tampers with each pin of a copy of the adapter (base weights, adapter file, classes, task,
   preprocessing) and counts the refusals.
4. Scores the adapter on the test split as a labelled manifest of 624 DICOM files: data no
   hospital held (external validation).

Prints ``device``, ``studies per second``, ``peak rss mb``, ``refused on a wrong pin`` and
``external auc``. ``--task segmentation``: a LiteMedSAM adapter on real hippocampus MRI
instead (``simulations.bench.predict_segmentation``).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from simulations.bench.pin_tampering import peak_rss_mb, refusals

logger = logging.getLogger(__name__)

CLASSES_DATASET = "pneumoniamnist"


def train_quick_run(run_dir: Path, rounds: int, max_train_examples: int, seed: int) -> Path:
    """The quick federation, in process; returns the run directory (with ``adapter/``)."""
    from client.app import build_client_app
    from models.config import ModelConfig, TrainConfig
    from models.registry import weights_sha256
    from server.config import FederationConfig
    from server.records import RunRecords
    from server.rounds import run_federation
    from simulations.config import DataConfig
    from simulations.datasets import class_names
    from simulations.inprocess import InProcessGrid
    from simulations.sites import SimulatedSiteLoader

    flower = logging.getLogger("flwr")  # one line per message otherwise
    flower.setLevel(logging.WARNING)
    flower.propagate = False
    data = DataConfig(max_train_examples=max_train_examples)
    grid = InProcessGrid(build_client_app(SimulatedSiteLoader(data, seed)),
                         {100 + k: {"partition-id": k} for k in range(data.num_hospitals)})
    model = ModelConfig(weights_sha256=weights_sha256("efficientnet-lite0-imagenet"))
    federation = FederationConfig(rounds=rounds, min_hospitals=2)
    run_federation(grid, federation, model, replace(TrainConfig(), seed=seed), None,
                   RunRecords(run_dir), classes=class_names(CLASSES_DATASET, 2))
    return run_dir


def test_split() -> tuple[np.ndarray, np.ndarray]:
    """PneumoniaMNIST's test split at its native size: ``(624, 28, 28)`` uint8 and labels."""
    from simulations.datasets import find_medmnist

    with np.load(find_medmnist(CLASSES_DATASET, download=False)) as data:
        return data["test_images"], data["test_labels"].reshape(-1).astype(int)


def write_studies(folder: Path, count: int, labelled: bool = False) -> Path:
    """``count`` DICOM studies from the test split under ``folder`` (image ``k % 624`` as
    ``NNNNN/kkkkk.dcm``, 1,000 a subfolder); with ``labelled`` also ``labelled.csv``.
    Returns the folder."""
    import csv

    from simulations.datasets import class_names
    from simulations.dicom_export import dicom_dataset

    images, labels = test_split()
    names = class_names(CLASSES_DATASET, 2)
    rows = []
    for k in range(count):
        name = f"{k // 1000:03d}/{k:05d}.dcm"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        dicom_dataset(images[k % len(images)], f"EXT-{k:05d}", full_range_window=True).save_as(
            folder / name, enforce_file_format=True)
        rows.append({"path": name, "label": names[labels[k % len(labels)]],
                     "patient_id": f"EXT-{k:05d}"})
    if labelled:
        with open(folder / "labelled.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "label", "patient_id"])
            writer.writeheader()
            writer.writerows(rows)
    return folder


def measure(run_dir: Path, folder: Path, out: Path, batch_size: int, device: str,
            threads: int = 0) -> dict:
    """Predict every file of ``folder`` with the run's adapter; speed and peak memory
    (``threads``: torch's CPU threads, 0 = its default)."""
    import torch

    from inference.predict import predict_studies
    from inference.published import load_published
    from inference.studies import folder_studies

    if threads:
        torch.set_num_threads(threads)
    published = load_published(run_dir, device)
    source = folder_studies(folder)
    outcome = predict_studies(published, source, out, batch_size)
    return {"device": str(published.device), "threads": torch.get_num_threads(),
            "studies": outcome.studies,
            "predicted": outcome.predicted,
            "studies_per_second": outcome.studies / outcome.seconds,
            "peak_rss_mb": peak_rss_mb()}


def external_auc(run_dir: Path, folder: Path, out: Path) -> dict:
    """The adapter scored on the labelled test split (624 DICOM studies)."""
    from inference.predict import predict_studies, reader_settings, write_reports
    from inference.published import load_published
    from inference.studies import manifest_studies

    published = load_published(run_dir, "cpu")
    source = manifest_studies(folder / "labelled.csv", reader_settings(published))
    outcome = predict_studies(published, source, out, 128)
    return write_reports(published, source, outcome, out)["external_validation"]


def _measure_in_child(run_dir: Path, folder: Path, out: Path, args: argparse.Namespace) -> dict:
    """:func:`measure` in a fresh Python process (its peak memory is its own)."""
    done = subprocess.run(
        [sys.executable, "-m", "simulations.bench.predict", "--measure", str(run_dir),
         str(folder), str(out), "--batch-size", str(args.batch_size), "--device", args.device,
         "--threads", str(args.threads)],
        capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace, work: Path) -> dict:
    """The whole bench in ``work``; returns its figures."""
    started = time.monotonic()
    run_dir = train_quick_run(work / "run", args.rounds, args.max_train_examples, args.seed)
    trained = time.monotonic()
    write_studies(work / "studies", args.studies)
    written = time.monotonic()
    speed = _measure_in_child(run_dir, work / "studies", work / "predictions", args)
    refused, tried, reasons = refusals(run_dir, work / "tampered")
    external = external_auc(run_dir, write_studies(work / "external", 624, labelled=True),
                            work / "external-predictions")
    return {**speed, "refused": refused, "tried": tried, "reasons": reasons,
            "external": external, "train_s": trained - started, "write_s": written - trained}


def _print(figures: dict) -> None:
    """The bench's figures, one per line (the lines docs/benchmarks.md quotes)."""
    external = figures["external"]
    for pin, reason in figures["reasons"].items():
        print(f"  {pin}: {reason}")
    print(f"trained in {figures['train_s']:.0f} s; {figures['studies']} DICOM studies written "
          f"in {figures['write_s']:.0f} s")
    print(f"device: {figures['device']}")
    print(f"torch threads: {figures['threads']}")
    print(f"studies per second: {figures['studies_per_second']:.1f}")
    print(f"peak rss mb: {figures['peak_rss_mb']:.0f}")
    print(f"refused on a wrong pin: {figures['refused']} of {figures['tried']}")
    print(f"external accuracy {external['accuracy']:.4f} (majority class "
          f"{external['majority_class_rate']:.4f}), balanced accuracy "
          f"{external['balanced_accuracy']:.4f}, brier {external['brier']:.4f}, ece "
          f"{external['ece']:.4f} on {external['studies']} studies")
    print(f"external auc: {external['auc']:.4f}")


def main(argv: list[str] | None = None) -> int:
    """Run the bench (or, with ``--measure``, only the timed prediction) and print figures."""
    parser = argparse.ArgumentParser(prog="python -m simulations.bench predict",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=10_000,
                        help="DICOM studies to predict on (default 10,000)")
    parser.add_argument("--task", choices=("classification", "segmentation"),
                        default="classification")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="studies (classification, default 64) or slices (segmentation, "
                             "default 8) at a time")
    parser.add_argument("--cases", type=int, default=4,
                        help="segmentation: real hippocampus cases to segment (default 4)")
    parser.add_argument("--adapter", type=Path,
                        help="segmentation: a published adapter or run (default: LiteMedSAM "
                             "with an all-zero LoRA, i.e. the pretrained network)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads for the timed prediction (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-train-examples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="keep the files here (default: a temp dir)")
    parser.add_argument("--measure", nargs=3, type=Path, metavar=("RUN", "FOLDER", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.task == "segmentation":
        return _segmentation(args)
    args.batch_size = args.batch_size or 64
    if args.measure:
        print(json.dumps(measure(*args.measure, args.batch_size, args.device, args.threads)))
        return 0
    return _in_work(args, run, _print, "medfed-predict-bench-")


def _segmentation(args: argparse.Namespace) -> int:
    """``--task segmentation``: the bench of ``simulations.bench.predict_segmentation``."""
    from simulations.bench.predict_segmentation import print_figures
    from simulations.bench.predict_segmentation import run as run_segmentation

    return _in_work(args, run_segmentation, print_figures, "medfed-predict-seg-bench-")


def _in_work(args: argparse.Namespace, run_bench, print_lines, prefix: str) -> int:
    """Run a bench in ``--work`` (kept) or a temporary folder, then print its lines."""
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        print_lines(run_bench(args, args.work))
        return 0
    with tempfile.TemporaryDirectory(prefix=prefix) as work:
        print_lines(run_bench(args, Path(work)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
