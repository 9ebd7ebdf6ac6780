"""``python -m simulations.bench predict --task segmentation``: ``medfed predict`` with a
LiteMedSAM segmentation adapter on real hippocampus MRI (MSD Task04).

1. The adapter: ``--adapter`` (a published segmentation adapter folder or its run), else
   LiteMedSAM with an all-zero LoRA published with its card (``lora_B`` = 0: the pretrained
   network itself, so the figures measure the pipeline and the zero-shot network in automatic
   mode, not a trained adapter).
2. The first ``--cases`` cases of ``../shared/data/hippocampus`` (in file-name order) with
   their masks, as a manifest; every slice goes through the encoder (no embedding cache), one
   study at a time, whole-slice box prompts.
3. Each pin of a copy of the adapter tampered in turn (base weights, adapter file, classes,
   task, preprocessing), counting the refusals.

Prints ``device``, ``segmentation studies per second``, ``segmentation slices per second``,
``peak rss mb`` (this process), ``refused on a wrong pin``, ``external dice`` and
``external hd95 mm`` (means over the cases, automatic mode).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "hippocampus"
CLASSES = ["background", "hippocampus"]


def segmentation_card(rank: int, alpha: int, study: str):
    """A segmentation adapter's card as the coordinator writes it (``server/card.py``'s
    fields) for LiteMedSAM with LoRA ``rank``/``alpha`` on the decoder's default targets."""
    from imaging.preprocessing import segmentation_preprocessing
    from models import litemedsam
    from models.card import AdapterCard, Decision, ModelPin, PrivacyRecord
    from server.card import code_commit, medfed_version

    return AdapterCard(
        format=1, study=study, declared_task="hippocampus-segmentation", task="segmentation",
        classes=list(CLASSES),
        model=ModelPin(backbone="litemedsam", weights_sha256=litemedsam.weights_sha256(),
                       lora_r=rank, lora_alpha=alpha, lora_dropout=0.0,
                       lora_targets=list(litemedsam.LORA_TARGETS)),
        preprocessing=segmentation_preprocessing(), rounds=1, published_round=0, hospitals=0,
        strategy="none", validation={},
        decision=Decision(rule="mask logit > 0 on each slice's own grid", prior=[],
                          select_by="dice", selection="no training: the pretrained network"),
        privacy=PrivacyRecord(dpsgd=False, update_dp=False, parameters={}, epsilon_max=None,
                              delta=None),
        secure_aggregation=False, medfed_version=medfed_version(), code_commit=code_commit())


def publish_zero_adapter(run_dir: Path, rank: int = 8, alpha: int = 16) -> Path:
    """``run_dir/adapter``: LiteMedSAM's decoder LoRA as initialised (B = 0) and its card."""
    from models.adapters import save_adapter
    from models.card import write_card
    from models.segmentation import build_segmenter

    folder = run_dir / "adapter"
    save_adapter(build_segmenter(rank, alpha), folder)
    write_card(folder, segmentation_card(rank, alpha, run_dir.name))
    return run_dir


def write_manifest(folder: Path, cases: int) -> Path:
    """A manifest of the first ``cases`` real cases (absolute paths) with their masks."""
    names = sorted(p.name for p in (DATA / "labels").glob("*.nii.gz")
                   if (DATA / "images" / p.name).is_file())[:cases]
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["image,mask"] + [f"{DATA / 'images' / n},{DATA / 'labels' / n}" for n in names]
    (folder / "cases.csv").write_text("\n".join(lines) + "\n")
    return folder / "cases.csv"


def run(args: argparse.Namespace, work: Path) -> dict:
    """The segmentation bench in ``work``; returns its figures."""
    import torch

    from inference.published import load_published
    from inference.seg_studies import manifest_segmentation_studies
    from inference.segment import segment_studies, write_segmentation_summary
    from simulations.bench.pin_tampering import peak_rss_mb, refusals

    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = args.adapter or publish_zero_adapter(work / "zero-shot")
    published = load_published(run_dir, args.device)
    source = manifest_segmentation_studies(write_manifest(work, args.cases), (DATA.resolve(),))
    outcome = segment_studies(published, source, work / "out", args.batch_size or 8)
    summary = write_segmentation_summary(published, source, outcome, work / "out")
    tampered = work / "tampered"
    shutil.copytree(published.folder, work / "to-tamper" / "adapter")
    refused, tried, reasons = refusals(work / "to-tamper", tampered)
    return {"summary": summary, "slices": outcome.slices, "seconds": outcome.seconds,
            "peak_rss_mb": peak_rss_mb(), "refused": refused, "tried": tried,
            "reasons": reasons, "threads": torch.get_num_threads()}


def print_figures(figures: dict) -> None:
    """The bench's lines."""
    summary = figures["summary"]
    external = summary["external_validation"]
    for pin, reason in figures["reasons"].items():
        print(f"  {pin}: {reason}")
    print(f"adapter: {summary['adapter']['folder']} ({summary['adapter']['study']})")
    print(f"device: {summary['device']}")
    print(f"torch threads: {figures['threads']}")
    print(f"segmentation studies: {summary['segmented']} of {summary['studies']}, "
          f"{figures['slices']} slices in {figures['seconds']:.1f} s")
    print(f"segmentation studies per second: {summary['studies_per_second']:.4f}")
    print(f"segmentation slices per second: {figures['slices'] / figures['seconds']:.3f}")
    print(f"peak rss mb: {figures['peak_rss_mb']:.0f}")
    print(f"refused on a wrong pin: {figures['refused']} of {figures['tried']}")
    print(f"external dice: {external['mean_dice']:.4f} (automatic mode, "
          f"{external['studies_scored']} studies)")
    print(f"external hd95 mm: {external['mean_hd95_mm']:.2f}")
