"""LiteMedSAM: the pinned checkpoint found through package metadata, loaded strictly into medfed's
own modules, and doing what it was trained for on real MRI slices (MSD hippocampus)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from imaging.segmentation import load_cases
from models import litemedsam
from models.registry import (
    SEGMENTATION_BACKBONE,
    SEGMENTATION_RANDOM_BACKBONE,
    backbone_spec,
    weights_sha256,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"
CASES = ("001", "003", "004", "006")


def hippocampus_manifest(folder: Path, cases: tuple[str, ...], split: str = "train") -> Path:
    """A segmentation manifest of real MSD hippocampus cases (absolute paths)."""
    names = [f"hippocampus_{c}.nii.gz" for c in cases]
    lines = ["image,mask,patient_id,split"] + [
        f"{DATA / 'images' / n},{DATA / 'labels' / n},p{c},{split}"
        for c, n in zip(cases, names, strict=True)]
    path = folder / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def tight_box(mask: torch.Tensor) -> torch.Tensor:
    """``(4,)`` box ``x0, y0, x1, y1`` around a 2D mask's foreground (inclusive pixels)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()


def test_checkpoint_is_found_pinned_and_loads_every_tensor_strictly():
    path = litemedsam.weights_path()
    assert path.name == "lite_medsam.pth" and path.stat().st_size == 39_370_479
    assert weights_sha256(SEGMENTATION_BACKBONE) == litemedsam.WEIGHTS_SHA256
    assert weights_sha256(SEGMENTATION_RANDOM_BACKBONE) != litemedsam.WEIGHTS_SHA256
    assert backbone_spec(SEGMENTATION_BACKBONE).task == "segmentation"
    model = litemedsam.build_litemedsam()
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert len(state) == len(model.state_dict()) == litemedsam.NUM_TENSORS
    for key, value in model.state_dict().items():  # the loaded values, not just the names
        assert torch.equal(value, state[key]), key
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters())
              for name in ("image_encoder", "prompt_encoder", "mask_decoder")}
    assert counts == {"image_encoder": 5_726_740, "prompt_encoder": 6_220,
                      "mask_decoder": 4_058_340}


def test_decoder_output_shape_and_box_dependence():
    model = litemedsam.build_litemedsam()
    embeddings = torch.randn(2, 256, 64, 64)
    boxes = torch.tensor([[10.0, 10.0, 60.0, 60.0], [150.0, 150.0, 250.0, 250.0]])
    with torch.no_grad():
        logits = model.decode(embeddings, boxes)
        swapped = model.decode(embeddings, boxes.flip(0))
    assert logits.shape == (2, 1, 256, 256)
    assert not torch.allclose(logits, swapped)


def _largest_slices(tmp_path: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each case's slice with the most foreground: ``(H, W)`` image and boolean mask."""
    cases, problems = load_cases(hippocampus_manifest(tmp_path, CASES), classes=(0, 1, 2),
                                 roots=(DATA,))
    assert not problems and len(cases) == len(CASES)
    out = []
    for case in cases:
        k = int((case.mask > 0).sum(axis=(1, 2)).argmax())
        out.append((torch.from_numpy(case.image[k]), torch.from_numpy(case.mask[k] > 0)))
    return out


def _dice(model: litemedsam.LiteMedSAM, slices: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean 2D Dice of the model's masks from tight boxes (slices may differ in size)."""
    inputs = torch.cat([litemedsam.preprocess_slices(image[None]) for image, _ in slices])
    boxes = torch.stack([litemedsam.box_to_model_grid(tight_box(mask)[None], *mask.shape)[0]
                         for _, mask in slices])
    with torch.no_grad():
        logits = model(inputs, boxes)
    scores = []
    for (_, mask), logit in zip(slices, logits, strict=True):
        pred = litemedsam.to_slice_grid(logit[None], *mask.shape)[0] > 0
        scores.append(float(2 * (pred & mask).sum() / (pred.sum() + mask.sum())))
    return float(np.mean(scores))


def test_pretrained_segments_real_hippocampus_slices_from_a_tight_box(tmp_path):
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is not here")
    slices = _largest_slices(tmp_path)
    pretrained = _dice(litemedsam.build_litemedsam(), slices)
    random_init = _dice(litemedsam.build_litemedsam(pretrained=False), slices)
    assert pretrained > 0.6, pretrained
    assert pretrained > random_init + 0.3, (pretrained, random_init)
    assert np.isfinite(random_init)
    print(f"tight-box Dice on {len(slices)} slices: pretrained {pretrained:.3f}, "
          f"random init {random_init:.3f}")
