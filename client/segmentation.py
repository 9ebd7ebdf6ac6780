"""The segmentation task at a hospital: what ``client.app``'s handlers call when the run's
backbone is a segmentation backbone (``litemedsam``).

The backbone decides the task (``models.registry.BackboneSpec.task``): the hospital's run
policy already decides which backbones it takes part with, so no new wire key and no new trust
is needed. Everything else of a round (the round-config reader, the run policy, replay checks,
client-level DP, the ledger, secure aggregation, the egress audit) is the classification
path's, unchanged. Local training is :func:`models.segmentation.train_segmenter` (LoRA on the
mask decoder over cached embeddings); evaluation is 3D Dice and HD95 per validation case, with
tight boxes and with the whole slice as the box (automatic mode).

DP-SGD is refused for segmentation (:func:`segmentation_trainer`): medfed's DP-SGD clips per
example, and one patient gives many slices, so a per-slice guarantee would not be a
per-patient one. Client-level DP (the update clipped and noised at the hospital) is available:
its unit is the whole hospital, patients included.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from peft import PeftModel
from torch import nn

from client.exchange import hospital_model_config, receive_adapter
from client.model_cache import lora_model_for
from client.privacy_round import PrivacyRefusal
from client.segmentation_site import SegmentationSite, case_count, load_segmentation_site
from models.config import ModelConfig, SegmentationConfig, TrainConfig, from_config_record
from models.registry import SEGMENTATION_BACKBONE, SEGMENTATION_RANDOM_BACKBONE
from models.segmentation import (
    BOX_MODES,
    predict_masks,
    train_segmenter,
    volume_dice,
    volume_hd95,
)
from privacy.config import DPConfig

SEGMENTATION_BACKBONES = (SEGMENTATION_BACKBONE, SEGMENTATION_RANDOM_BACKBONE)


def is_segmentation(config: ConfigRecord) -> bool:
    """Whether the round's (typed) config names a segmentation backbone."""
    return str(config.get("backbone", "")) in SEGMENTATION_BACKBONES


def prepare_segmentation(config: ConfigRecord, arrays: ArrayRecord | None, context: Context
                         ) -> tuple[PeftModel, SegmentationSite]:
    """The hospital's LoRA segmenter holding the coordinator's adapter (``arrays``; ``None``:
    the slices only are wanted, which the frozen encoder alone gives), and its slices."""
    model_config = hospital_model_config(from_config_record(ModelConfig, config), config,
                                         context)
    settings = from_config_record(SegmentationConfig, config)
    model = lora_model_for(model_config)
    if arrays is not None:
        receive_adapter(model, arrays, config, context)
    site = load_segmentation_site(context, model, settings, list(config.get("classes", [])))
    return model, site


def segmentation_trainer(site: SegmentationSite, config: ConfigRecord, dp: DPConfig
                         ) -> Callable[[nn.Module, TrainConfig, int, float | None], float]:
    """The local training of a segmentation round, for ``client.privacy_round.train_round``.

    Steps per round: ``local_steps``, else ``local_epochs`` passes over the training slices
    at ``batch_size`` slices a step.

    Raises:
        PrivacyRefusal: the run asks for DP-SGD (see the module's docstring).
    """
    if dp.dpsgd:
        raise PrivacyRefusal("DP-SGD is not available for segmentation (it would protect a "
                             "slice, not a patient): use client-level DP ([privacy] "
                             "update_dp = true)")
    settings = from_config_record(SegmentationConfig, config)

    def train(model: nn.Module, train_config: TrainConfig, seed: int, lr: float | None) -> float:
        steps = train_config.local_steps or train_config.local_epochs * math.ceil(
            len(site.train) / train_config.batch_size)
        return train_segmenter(model, site.train, steps, train_config.batch_size,
                               train_config.lr if lr is None else lr, seed,
                               mode=settings.prompt, max_shift=settings.box_shift)

    return train


def segmentation_scores(model: PeftModel, site: SegmentationSite) -> dict[str, float]:
    """Mean over the validation cases of 3D Dice and HD95 (mm), per prompt mode: ``dice``,
    ``hd95`` (tight boxes), ``dice_whole``, ``hd95_whole`` (the whole slice)."""
    scores: dict[str, float] = {}
    cases = site.val.cases
    for mode in BOX_MODES:
        suffix = "" if mode == "tight" else f"_{mode}"
        predicted = predict_masks(model, site.val, mode)
        scores[f"dice{suffix}"] = float(np.mean(volume_dice(predicted, site.val.masks, cases)))
        distances = []
        for number in torch.unique(cases).tolist():
            index = (cases == number).nonzero().flatten()
            distances += volume_hd95([predicted[i] for i in index.tolist()],
                                     [site.val.masks[i] for i in index.tolist()],
                                     cases[index], site.val_spacing[number])
        scores[f"hd95{suffix}"] = float(np.mean(distances))
    return scores


def validation_count(site: SegmentationSite) -> int:
    """The validation set's size as a reply counts it: its cases (volumes)."""
    return case_count(site.val)
