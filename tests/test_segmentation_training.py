"""The segmentation training path on real hippocampus slices: embeddings computed once and then
read from the cache, LoRA trains only mask-decoder adapter tensors and fits the slices better
than the pretrained network, and 3D Dice, box jitter and the U-Net baseline behave."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from imaging.segmentation import foreground_slices, load_cases
from models.adapters import adapter_nbytes, adapter_state
from models.segmentation import (
    build_segmenter,
    embedding_cache,
    jitter_boxes,
    make_slice_set,
    predict_masks,
    train_segmenter,
    volume_dice,
)
from models.unet_segmentation import build_unet, pad_slices, predict_unet, train_unet

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"
CASE = "hippocampus_004.nii.gz"


def _slices(tmp_path: Path, count: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,mask,patient_id,split\n"
                        f"{DATA / 'images' / CASE},{DATA / 'labels' / CASE},p4,train\n")
    cases, problems = load_cases(manifest, classes=(0, 1, 2), roots=(DATA,))
    assert not problems
    case = cases[0]
    index = foreground_slices(case.mask)
    index = index[np.linspace(0, len(index) - 1, count + 2).round().astype(int)[1:-1]]
    return ([torch.from_numpy(case.image[k].copy()) for k in index],
            [torch.from_numpy(case.mask[k] > 0) for k in index])


@pytest.mark.skipif(not DATA.is_dir(), reason="no hippocampus data")
def test_lora_on_cached_embeddings_fits_real_slices(tmp_path):
    images, masks = _slices(tmp_path, 2)
    model = build_segmenter(rank=4, alpha=8)
    base = model.get_base_model()
    cache = embedding_cache(tmp_path / "cache")
    data = make_slice_set(base, images, masks, [0, 0], cache)
    assert data.embeddings.shape == (2, 256, 64, 64) and cache.misses == 2
    again = make_slice_set(base, images, masks, [0, 0], embedding_cache(tmp_path / "cache"))
    assert torch.equal(again.embeddings, data.embeddings)  # read back from disk, not recomputed

    frozen = {k: v.clone() for k, v in base.state_dict().items() if "lora_" not in k}
    state = adapter_state(model)
    assert state and all("mask_decoder." in k and "lora_" in k for k in state)
    assert adapter_nbytes(state) * 50 < sum(v.numel() * 4 for v in frozen.values())
    before = np.mean(volume_dice(predict_masks(model, data), data.masks, data.cases))
    loss = train_segmenter(model, data, steps=8, batch_size=2, lr=3e-3, seed=0)
    after = np.mean(volume_dice(predict_masks(model, data), data.masks, data.cases))
    assert np.isfinite(loss)
    assert after > before + 0.02, (before, after)
    changed = [k for k, v in base.state_dict().items() if "lora_" not in k
               and not torch.equal(v, frozen[k])]
    assert changed == []


def test_volume_dice_stacks_slices_per_case():
    a = torch.zeros(4, 4, dtype=torch.bool)
    a[:2] = True
    b = torch.zeros(4, 4, dtype=torch.bool)
    b[:1] = True
    cases = torch.tensor([0, 0, 1])
    # case 0: predicted 8 + 4 pixels, true 8 + 8, overlap 8 + 4 -> 24 / 28; case 1: perfect
    scores = volume_dice([a, b, a], [a, a, a], cases)
    assert scores == pytest.approx([24 / 28, 1.0])


def test_box_jitter_moves_sides_outward_within_bounds():
    boxes = torch.tensor([[100.0, 100.0, 150.0, 160.0], [0.0, 5.0, 250.0, 255.0]]).repeat(50, 1)
    moved = jitter_boxes(boxes, torch.Generator().manual_seed(0))
    assert (moved[:, :2] <= boxes[:, :2]).all() and (moved[:, 2:] >= boxes[:, 2:]).all()
    assert ((boxes - moved).abs() <= 20).all() and moved.min() >= 0 and moved.max() <= 255
    assert (moved != boxes).any()


@pytest.mark.skipif(not DATA.is_dir(), reason="no hippocampus data")
def test_unet_baseline_learns_real_slices(tmp_path):
    images, masks = _slices(tmp_path, 4)
    net = build_unet()
    x = pad_slices(images)
    y = pad_slices([m.float() for m in masks])
    before = np.mean(volume_dice(predict_unet(net, images), masks, torch.zeros(4, dtype=int)))
    train_unet(net, x, y, steps=60, batch_size=4, lr=3e-3, seed=0)
    after = np.mean(volume_dice(predict_unet(net, images), masks, torch.zeros(4, dtype=int)))
    assert after > max(before, 0.3) + 0.1, (before, after)
