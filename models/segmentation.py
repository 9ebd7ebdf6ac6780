"""Box-prompted segmentation with LiteMedSAM: cached image embeddings, LoRA on the mask decoder,
Dice+CE training, 3D Dice per volume. Plain typed functions, usable from a ClientApp.

The image encoder is frozen: each slice's embedding ``(256, 64, 64)`` is computed once and kept
(``models.prefix_cache.PrefixCache``, keyed by the preprocessed input's bytes, scoped by the
weights' SHA-256 and :data:`models.litemedsam.PREPROCESSING`; on disk under a folder that may
hold patient-derived data). Training then runs only the prompt encoder and mask decoder, with
LoRA (peft) on the decoder's attention projections (and optionally its MLPs).

Coordinates: boxes are ``x0, y0, x1, y1`` in pixels of the 256 x 256 model grid; masks for the
loss are on that grid ``(N, 256, 256)``; predictions are mapped back to each slice's own grid
``(H, W)`` before any Dice.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, compute_hausdorff_distance
from peft import LoraConfig, PeftModel, get_peft_model

from models import litemedsam
from models.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)

BOX_MODES = ("tight", "whole")
"""``tight``: the box around the slice's foreground (jittered in training); ``whole``: the
whole slice as the box (automatic mode: no prompt from the user)."""
MAX_BOX_SHIFT = 20
"""Training jitter: each box side moves outward by 0-20 px of the 256 grid (MedSAM's
``bbox_shift``)."""
DEFAULT_CACHE_BYTES = 2 << 30


@dataclass
class SliceSet:
    """Slices ready for the decoder.

    Attributes:
        embeddings: ``(N, 256, 64, 64)`` frozen image embeddings.
        targets: ``(N, 256, 256)`` float {0, 1} masks on the model grid.
        masks: ``N`` boolean ``(H, W)`` masks on each slice's own grid.
        boxes: ``(N, 4)`` tight boxes on the model grid.
        whole: ``(N, 4)`` whole-slice boxes on the model grid.
        cases: ``(N,)`` int64 case index of each slice (its volume, for 3D Dice).
    """

    embeddings: torch.Tensor
    targets: torch.Tensor
    masks: list[torch.Tensor]
    boxes: torch.Tensor
    whole: torch.Tensor
    cases: torch.Tensor

    def __len__(self) -> int:
        return len(self.masks)

    def subset(self, index: torch.Tensor) -> SliceSet:
        """The slices at ``index`` (a 1D int tensor)."""
        return SliceSet(self.embeddings[index], self.targets[index],
                        [self.masks[i] for i in index.tolist()], self.boxes[index],
                        self.whole[index], self.cases[index])


def embedding_cache(folder: Path | None, weights_id: str = litemedsam.WEIGHTS_SHA256,
                    max_bytes: int = DEFAULT_CACHE_BYTES) -> PrefixCache:
    """A cache of image embeddings for one set of encoder weights and preprocessing."""
    return PrefixCache(max_bytes, folder, scope=f"litemedsam:{weights_id}:"
                       f"{litemedsam.PREPROCESSING}")


def tight_boxes(masks: list[torch.Tensor]) -> torch.Tensor:
    """``(N, 4)`` boxes ``x0, y0, x1, y1`` around each ``(H, W)`` mask's foreground, on its own
    pixel grid (inclusive). Every mask must hold foreground."""
    out = []
    for mask in masks:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(ys) == 0:
            raise ValueError("a slice without foreground has no box")
        out.append(torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float())
    return torch.stack(out)


def embed_slices(model: litemedsam.LiteMedSAM, images: list[torch.Tensor], cache: PrefixCache,
                 batch_size: int = 4) -> torch.Tensor:
    """``N`` ``(H, W)`` slices in [0, 1] -> ``(N, 256, 64, 64)`` embeddings, computing only
    those not cached."""
    inputs = torch.cat([litemedsam.preprocess_slices(image[None]) for image in images])
    chunks = [cache.activations(inputs[i : i + batch_size], 0, model.embed)
              for i in range(0, len(inputs), batch_size)]
    return torch.cat(chunks)


def make_slice_set(model: litemedsam.LiteMedSAM, images: list[torch.Tensor],
                   masks: list[torch.Tensor], cases: list[int],
                   cache: PrefixCache) -> SliceSet:
    """Embed ``(H, W)`` slices (each with foreground) and put their masks and boxes on the
    model grid."""
    boxes, whole, targets = [], [], []
    for mask, box in zip(masks, tight_boxes(masks), strict=True):
        height, width = mask.shape
        boxes.append(litemedsam.box_to_model_grid(box[None], height, width)[0])
        crop = torch.tensor([0.0, 0.0, width - 1, height - 1])
        whole.append(litemedsam.box_to_model_grid(crop[None], height, width)[0])
        targets.append(litemedsam.to_model_grid(mask[None]))
    return SliceSet(embed_slices(model, images, cache), torch.cat(targets),
                    [m.bool() for m in masks], torch.stack(boxes), torch.stack(whole),
                    torch.tensor(cases, dtype=torch.long))


def build_segmenter(rank: int = 8, alpha: int = 16,
                    targets: tuple[str, ...] = litemedsam.LORA_TARGETS,
                    pretrained: bool = True) -> PeftModel:
    """LiteMedSAM with LoRA on the named mask-decoder layers; everything else frozen.

    Only modules under ``mask_decoder`` are wrapped (the encoder's attention uses other names,
    and is frozen and cached anyway).
    """
    model = litemedsam.build_litemedsam(pretrained=pretrained)
    names = [n for n, m in model.named_modules() if n.startswith("mask_decoder.")
             and isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    if not names:
        raise ValueError(f"no mask-decoder Linear layer is named any of {targets}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=names)
    return get_peft_model(model, config)


def _decoder(model: PeftModel | litemedsam.LiteMedSAM) -> litemedsam.LiteMedSAM:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def jitter_boxes(boxes: torch.Tensor, generator: torch.Generator,
                 max_shift: int = MAX_BOX_SHIFT) -> torch.Tensor:
    """Each side of each ``(N, 4)`` box moved outward by a uniform 0..max_shift px, clamped to
    the 256 grid."""
    shift = torch.randint(0, max_shift + 1, boxes.shape, generator=generator).float()
    moved = boxes + shift * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    return moved.clamp(0, litemedsam.IMAGE_SIZE - 1)


def prompt_boxes(data: SliceSet, mode: str) -> torch.Tensor:
    """The evaluation prompts: tight boxes, or whole slices (automatic mode)."""
    if mode not in BOX_MODES:
        raise ValueError(f"box mode '{mode}' is not one of {BOX_MODES}")
    return data.boxes if mode == "tight" else data.whole


def segmentation_loss() -> DiceCELoss:
    """MONAI's Dice + binary cross-entropy on ``(B, 1, 256, 256)`` logits (MedSAM's loss:
    sigmoid Dice with squared predictions, plus BCE)."""
    return DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")


def train_segmenter(model: PeftModel, data: SliceSet, steps: int, batch_size: int, lr: float,
                    seed: int, mode: str = "tight", max_shift: int = MAX_BOX_SHIFT) -> float:
    """Train the model's trainable tensors (the LoRA factors) in place; mean training loss.

    Args:
        model: from :func:`build_segmenter`.
        data: the hospital's training slices.
        steps: optimiser steps (batches drawn by a seeded shuffle, epoch after epoch).
        batch_size: slices per step.
        lr: AdamW learning rate (no weight decay).
        seed: seeds the batch order and the box jitter.
        mode: ``tight`` (jittered boxes around the foreground) or ``whole`` (the whole slice).
        max_shift: the tight boxes' jitter, pixels of the 256 grid per side.
    """
    if len(data) == 0:
        raise ValueError("no training slices at this hospital")
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss_fn, net = segmentation_loss(), _decoder(model)
    net.train()
    total, order = 0.0, torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < min(batch_size, len(data)):
            order = torch.cat([order, torch.randperm(len(data), generator=generator)])
        index, order = order[:batch_size], order[batch_size:]
        boxes = (jitter_boxes(data.boxes[index], generator, max_shift) if mode == "tight"
                 else data.whole[index])
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net.decode(data.embeddings[index], boxes), data.targets[index][:, None])
        loss.backward()
        optimizer.step()
        total += loss.item()
    net.eval()
    mean = total / steps
    if not math.isfinite(mean):
        raise FloatingPointError(f"segmentation training loss is {mean}: lower the learning rate")
    return mean


def predict_masks(model: PeftModel | litemedsam.LiteMedSAM, data: SliceSet, mode: str = "tight",
                  batch_size: int = 8) -> list[torch.Tensor]:
    """Boolean ``(H, W)`` masks for every slice (logit > 0 on the slice's own grid)."""
    net, boxes = _decoder(model), prompt_boxes(data, mode)
    net.eval()
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            end = min(start + batch_size, len(data))
            logits = net.decode(data.embeddings[start:end], boxes[start:end])
            for logit, mask in zip(logits, data.masks[start:end], strict=True):
                out.append(litemedsam.to_slice_grid(logit[None], *mask.shape)[0] > 0)
    return out


def volume_dice(predictions: list[torch.Tensor], masks: list[torch.Tensor],
                cases: torch.Tensor) -> list[float]:
    """3D Dice per case (MONAI ``DiceMetric``), in case order: each case's predicted ``(H, W)``
    slices stacked against its true ones. Slices not given count as predicted empty and truly
    empty (the caller passes every slice it scores of a volume, e.g. those holding foreground).
    """
    metric = DiceMetric(include_background=True, reduction="none")
    scores = []
    for case in torch.unique(cases).tolist():
        index = (cases == case).nonzero().flatten().tolist()
        pred = torch.stack([predictions[i] for i in index]).float()[None, None]
        true = torch.stack([masks[i] for i in index]).float()[None, None]
        scores.append(float(metric(pred, true).item()))
    return scores


def volume_hd95(predictions: list[torch.Tensor], masks: list[torch.Tensor], cases: torch.Tensor,
                spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> list[float]:
    """95 % Hausdorff distance per case in millimetres (MONAI ``compute_hausdorff_distance``,
    ``percentile=95``), in case order, over each case's stacked ``(H, W)`` slices.

    ``spacing``: millimetres between stacked slices and along ``H`` and ``W``. A case whose
    prediction is empty gets the diagonal of its stacked grid (the largest distance the grid
    holds) rather than an infinite or undefined distance, so that a mean stays finite and an
    empty prediction scores as the worst, not as missing.
    """
    scores = []
    for case in torch.unique(cases).tolist():
        index = (cases == case).nonzero().flatten().tolist()
        pred = torch.stack([predictions[i] for i in index]).float()[None, None]
        true = torch.stack([masks[i] for i in index]).float()[None, None]
        worst = math.dist([0.0] * 3, [n * s for n, s in zip(pred.shape[2:], spacing,
                                                            strict=True)])
        if not pred.any() or not true.any():
            scores.append(worst)
            continue
        value = float(compute_hausdorff_distance(pred, true, percentile=95.0,
                                                 spacing=list(spacing)).item())
        scores.append(value if math.isfinite(value) else worst)
    return scores


def spread(indices: list[int], count: int) -> list[int]:
    """``count`` entries of ``indices`` evenly spaced inside them, ends left out (the first
    and last foreground slices hold the smallest pieces of a structure; the bench chooses
    slices the same way); all of them when ``count`` is 0 or at least their number."""
    if count <= 0 or count >= len(indices):
        return list(indices)
    positions = np.linspace(0, len(indices) - 1, count + 2).round().astype(int)[1:-1]
    return [indices[int(k)] for k in positions]
