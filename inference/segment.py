"""Segment studies with a published LiteMedSAM adapter, one study at a time; write the outputs.

Each study is read (``inference.seg_volumes``), every slice goes through the frozen encoder
(``batch_size`` slices at a time; with an embedding cache folder, a slice seen before is read
back instead) and the adapted mask decoder with the **whole slice as the box** (automatic mode:
a new study has no mask to draw a box from), and the logits above 0, back on the slice's own
grid, are the mask. Memory is one study's slices and embeddings. The output folder holds:

- ``masks/<study>.nii.gz``: the mask (uint8, 1 = the structure) on the image's grid: a NIfTI
  input's shape, affine and qform/sform codes; a DICOM series' ``(I columns, J rows, K slices)``
  grid and RAS affine (as ``imaging.volumes.read_dicom_series`` reads it);
- ``seg/<study>.dcm`` (DICOM series input): a DICOM SEG referencing the series
  (``inference.dicom_seg``);
- ``predictions.csv``: one row per study: ``study``, ``slices``, ``voxels`` (segmented),
  ``volume_mm3``, ``mask_nifti``, ``dicom_seg``, and with a mask column ``dice`` and
  ``hd95_mm`` (``inference.seg_metrics``), ``error`` (why a study could not be read);
- ``summary.json``: the adapter, the input, counts, device, speed and the mean Dice and HD95.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from core.settings import SettingsError
from imaging.guard import DicomReadError
from inference.dicom_seg import PROMPT, SegWriteError, write_dicom_seg
from inference.predict import PREDICTIONS_FILE, SUMMARY_FILE, Progress
from inference.published import Published, adapter_summary
from inference.seg_metrics import dice_and_hd95, mean_of
from inference.seg_studies import SegSource, SegStudy
from inference.seg_volumes import StudyVolume, read_study
from models import litemedsam
from models.prefix_cache import PrefixCache
from models.segmentation import embedding_cache

logger = logging.getLogger(__name__)

COLUMNS = ("study", "slices", "voxels", "volume_mm3", "mask_nifti", "dicom_seg", "dice",
           "hd95_mm", "error")
MASKS_DIR, SEG_DIR = "masks", "seg"
CACHE_BYTES = 256 << 20
"""Embeddings kept in memory when a cache folder is given (4 MiB a slice)."""


@dataclass
class SegOutcome:
    """What a segmentation run produced.

    Attributes:
        studies: studies in the input; segmented: those with a mask written.
        slices: slices segmented; failed: unreadable studies by problem kind.
        dice, hd95: per scored study (None: not defined for it).
        seconds: wall time of reading, segmenting and writing.
    """

    studies: int = 0
    segmented: int = 0
    slices: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    dice: list[float | None] = field(default_factory=list)
    hd95: list[float | None] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def segment_planes(published: Published, planes: np.ndarray, cache: PrefixCache,
                   batch_size: int) -> np.ndarray:
    """``(N, H, W)`` slices in [0, 1] -> ``(N, H, W)`` boolean masks, whole-slice box prompts."""
    net, device = published.model.get_base_model(), published.device
    height, width = planes.shape[1:]
    corner = torch.tensor([[0.0, 0.0, width - 1.0, height - 1.0]])
    box = litemedsam.box_to_model_grid(corner, height, width).to(device)
    out = []
    for start in range(0, len(planes), batch_size):
        # Slice by slice, as training's embed_slices prepares them: same bytes, same cache key.
        inputs = torch.cat([litemedsam.preprocess_slices(torch.from_numpy(p)[None])
                            for p in planes[start:start + batch_size]])
        embeddings = cache.activations(inputs, 0, lambda x: net.embed(x.to(device)).cpu())
        logits = net.decode(embeddings.to(device), box.expand(len(inputs), 4)).float().cpu()
        out.append((litemedsam.to_slice_grid(logits, height, width) > 0).numpy())
    return np.concatenate(out)


def output_name(identifier: str, taken: set[str]) -> str:
    """A file-name stem for a study, unique in ``taken`` (added to it)."""
    stem = re.sub(r"\.nii(\.gz)?$", "", identifier.strip("/"), flags=re.IGNORECASE)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "study"
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    taken.add(name)
    return name


def write_mask_nifti(volume: StudyVolume, mask: np.ndarray, path: Path) -> Path:
    """The ``(N, H, W)`` mask as a uint8 NIfTI on the image's grid (affine, qform/sform)."""
    image = nib.Nifti1Image(volume.to_nifti_array(mask.astype(np.uint8)), volume.affine)
    header = volume.header
    image.set_qform(volume.affine, int(header["qform_code"]) if header is not None else 1)
    image.set_sform(volume.affine, int(header["sform_code"]) if header is not None else 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def _segment_one(published: Published, study: SegStudy, cache: PrefixCache, batch_size: int,
                 out_dir: Path, name: str, outcome: SegOutcome) -> dict[str, Any]:
    """Read, segment and write one study; its CSV row."""
    volume = read_study(study)
    mask = segment_planes(published, volume.planes, cache, batch_size)
    voxels = int(mask.sum())
    row: dict[str, Any] = {
        "study": study.identifier, "slices": len(mask), "voxels": voxels,
        "volume_mm3": f"{voxels * abs(float(np.linalg.det(volume.affine[:3, :3]))):.6g}",
        "mask_nifti": str(write_mask_nifti(volume, mask, out_dir / MASKS_DIR /
                                           f"{name}.nii.gz"))}
    if volume.datasets is not None:
        try:
            row["dicom_seg"] = str(write_dicom_seg(
                volume.datasets, mask, published.card, _version(published),
                out_dir / SEG_DIR / f"{name}.dcm"))
        except SegWriteError as err:
            row["error"] = f"dicom-seg: {err}"
            outcome.failed["dicom-seg"] += 1
    if volume.truth is not None:
        dice, hd95 = dice_and_hd95(volume.to_nifti_array(mask), volume.to_nifti_array(
            volume.truth), volume.voxel_mm())
        outcome.dice.append(dice)
        outcome.hd95.append(hd95)
        row |= {"dice": "" if dice is None else f"{dice:.6f}",
                "hd95_mm": "" if hd95 is None else f"{hd95:.4f}"}
    outcome.segmented += 1
    outcome.slices += len(mask)
    return row


def _version(published: Published) -> str:
    """medfed's version and the adapter's hash prefix, for the SEG's software version."""
    adapter = published.card.adapter_files.get("adapter_model.safetensors", "")
    return f"medfed {published.card.medfed_version} adapter {adapter[:16]}"


def segment_studies(published: Published, source: SegSource, out_dir: Path,
                    batch_size: int = 8, cache_dir: Path | None = None,
                    progress: Progress | None = None) -> SegOutcome:
    """Segment every study of ``source`` into ``out_dir`` (module docstring), one study at a
    time, ``batch_size`` slices through the encoder at once; ``progress(1)`` after each study.

    ``cache_dir``: keep slice embeddings there (patient-derived data: a folder inside the
    hospital's data area); None: nothing is kept between slices.
    """
    if batch_size < 1:
        raise SettingsError(f"--batch-size {batch_size}: must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = (embedding_cache(cache_dir, published.card.model.weights_sha256, CACHE_BYTES)
             if cache_dir is not None else PrefixCache(0))
    outcome, taken = SegOutcome(), set()
    started = time.monotonic()
    with open(out_dir / PREDICTIONS_FILE, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for study in source.studies:
            try:
                row = _segment_one(published, study, cache, batch_size, out_dir,
                                   output_name(study.identifier, taken), outcome)
            except DicomReadError as err:
                row = {"study": study.identifier, "error": f"{err.kind}: {err.reason}"}
                outcome.failed[err.kind] += 1
            writer.writerow(row)
            handle.flush()
            outcome.studies += 1
            if progress is not None:
                progress(1)
    outcome.seconds = time.monotonic() - started
    logger.info("%d of %d studies segmented (%d slices) in %.1f s (%s)", outcome.segmented,
                outcome.studies, outcome.slices, outcome.seconds, published.device)
    return outcome


def write_segmentation_summary(published: Published, source: SegSource, outcome: SegOutcome,
                               out_dir: Path) -> dict[str, Any]:
    """Write ``summary.json``; returns it (with ``external_validation`` for a mask column)."""
    card = published.card
    summary: dict[str, Any] = {
        "adapter": adapter_summary(published),
        "input": source.description, "labelled": source.labelled, "prompt": PROMPT,
        "studies": outcome.studies, "segmented": outcome.segmented, "slices": outcome.slices,
        "failed": dict(outcome.failed), "device": str(published.device),
        "seconds": round(outcome.seconds, 3),
        "studies_per_second": round(outcome.studies / outcome.seconds, 4)
        if outcome.seconds > 0 else None,
        "predictions": str(Path(out_dir) / PREDICTIONS_FILE),
    }
    if source.labelled:
        summary["external_validation"] = {
            "studies_scored": sum(d is not None for d in outcome.dice),
            "mean_dice": mean_of(outcome.dice), "mean_hd95_mm": mean_of(outcome.hd95),
            "structure": card.classes[1]}
    (Path(out_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
