"""A published LiteMedSAM segmentation adapter folder, laid out as the coordinator publishes one
(``server/card.py``: peft's ``save_pretrained`` files, then ``models.card.write_card`` with
the card ``simulations.bench.predict_segmentation`` writes), and
small real hippocampus studies (a few consecutive slices of real NIfTI cases and of a real
DICOM series) for the segmentation predict tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from imaging.volumes import place_series
from models.adapters import save_adapter
from models.card import write_card
from models.segmentation import build_segmenter
from simulations.bench.predict_segmentation import segmentation_card

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"
RANK, ALPHA = 4, 8


def publish_segmenter(folder: Path, seed: int = 0) -> Path:
    """LoRA rank 4 on the mask decoder with small seeded values in its ``lora_B`` factors (a
    stand-in for trained ones: the adapter changes the output), saved and carded."""
    model = build_segmenter(RANK, ALPHA)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "lora_B" in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.01)
    save_adapter(model, folder)
    card = segmentation_card(RANK, ALPHA, "hippocampus-test")
    write_card(folder, card)
    return folder


def small_nifti_case(case: str, folder: Path, slices: int) -> tuple[Path, Path]:
    """``slices`` consecutive real slices (along the first axis, through the middle of the
    structure) of a real case and its mask, as NIfTI files with the matching affine."""
    image = nib.load(DATA / "images" / case)
    mask = nib.load(DATA / "labels" / case)
    labels = np.asarray(mask.dataobj)
    held = np.flatnonzero((labels > 0).any(axis=(1, 2)))
    start = int(held[len(held) // 2]) - slices // 2
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for source, kind in ((image, "image"), (mask, "mask")):
        part = source.slicer[start:start + slices]  # nibabel shifts the affine's origin
        path = folder / f"{kind}-{case}"
        nib.save(part, path)
        out.append(path)
    return out[0], out[1]


def small_series(folder: Path, slices: int, study: str = "study1") -> Path:
    """``slices`` consecutive files of a real DICOM series (from its middle), copied."""
    placed = place_series(DATA / "dicom-series" / study)
    start = len(placed.files) // 2 - slices // 2
    folder.mkdir(parents=True, exist_ok=True)
    for path in placed.files[start:start + slices]:
        shutil.copy(path, folder / path.name)
    return folder
