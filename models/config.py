"""Typed settings both sides need: which model the run adapts and how hospitals train it.

The coordinator owns these and sends them to every hospital in each round's ConfigRecord, so a
hospital never needs the coordinator's config file. Keys on the wire use Flower's dashed style.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TypeVar

from flwr.app import ConfigRecord

from core.settings import load_settings, setting

T = TypeVar("T", "ModelConfig", "TrainConfig", "SegmentationConfig")

DEFAULT_BACKBONE = "efficientnet-lite0-imagenet"
OPTIMIZERS = ("adamw", "sgd")
"""Local optimisers a hospital trains with (``TrainConfig.optimizer``)."""
TRAINABLE = ("all", "adapter", "head")
"""What local training may move (``TrainConfig.trainable``)."""


@dataclass
class ModelConfig:
    """The foundation model and its LoRA adapter.

    Attributes:
        backbone: registry name (``efficientnet-lite0-imagenet``) or ``hf:<dir-or-hub-id>``;
            a segmentation backbone (``litemedsam``) makes the study a segmentation study
            (``[segmentation]``; set ``image_size = 256``, its fixed input).
        image_size: side of the square input in pixels.
        num_classes: output classes of the new task head.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: dropout on the LoRA input.
        lora_targets: module names LoRA wraps; empty means the backbone's default.
        weights_sha256: pinned hash of the base weights; empty means "whatever the registry ships",
            filled in by the coordinator before the run starts.
    """

    backbone: str = DEFAULT_BACKBONE
    image_size: int = setting(48, ge=8)
    num_classes: int = setting(2, ge=2)
    lora_r: int = setting(8, ge=1)
    lora_alpha: int = setting(16, ge=1)
    lora_dropout: float = setting(0.0, ge=0.0, lt=1.0)
    lora_targets: list[str] = field(default_factory=list)
    weights_sha256: str = ""


@dataclass
class TrainConfig:
    """Local training at each hospital, per round.

    The defaults were chosen on the default run (how, and what the others gave:
    docs/results/2026-11-29-default-run-tuning.md); they are also the training settings of
    ``simulations.bench dp-utility``.

    Attributes:
        local_epochs: passes over the hospital's training split per round (when
            ``local_steps`` is 0).
        local_steps: optimiser steps per round, cycling over the data (0: use ``local_epochs``).
            Equal steps keep a large hospital from drifting further than the rest in a round.
        batch_size: images per optimiser step.
        lr: learning rate in round 1.
        lr_decay: factor applied to the learning rate after each round (1.0: constant); later
            rounds then move the shared adapter less, which steadies FedAvg under label skew.
        weight_decay: weight decay (decoupled for AdamW, L2 for SGD).
        optimizer: the local optimiser, ``adamw`` or ``sgd`` (with ``momentum``). SGD's steps
            scale with the gradient, so a single-class hospital's near-zero (logit-adjusted)
            gradients barely move the shared adapter, where Adam normalises them to full
            steps: plain FedAvg stays steady under label skew. SGD wants a larger ``lr``.
        momentum: SGD's momentum (``optimizer = "sgd"`` only); the state starts afresh each
            round.
        seed: base seed; each hospital and round derives its own from it.
        logit_adjust: train on logits shifted by the log of the hospital's own class prior
            (FedLC-style logit adjustment), which keeps label-skewed hospitals from pulling the
            shared head towards their label mix. The plain logits then give a class-balanced
            rule; ``evaluation.prior`` puts a population's prior back into the published
            adapter.
        proximal_mu: FedProx's proximal weight: the local loss adds
            ``mu/2 * ||w - w_round_start||^2`` over the trained tensors (0: off). Not a study
            setting: the coordinator's FedProx sends it in each round's config
            (``proximal-mu``, from ``[federation.options] proximal_mu``).
        trainable: which tensors local training moves: ``all`` (the LoRA factors and the
            head), ``adapter`` (the LoRA factors; the head stays as the round's global adapter
            holds it) or ``head`` (the LoRA factors stay). Meant for a federation that starts
            from a trained adapter, such as a public start. Under DP-SGD every example's
            gradient is clipped as one vector over the trained tensors and noised in each of
            their coordinates, so training fewer tensors sends the clipping bound and the
            noise to those alone.
    """

    local_epochs: int = setting(2, ge=1)
    local_steps: int = setting(0, ge=0)
    batch_size: int = setting(64, ge=1)
    lr: float = setting(2e-3, gt=0.0)
    lr_decay: float = setting(1.0, gt=0.0)
    weight_decay: float = setting(0.0, ge=0.0)
    optimizer: str = setting("adamw", choices=OPTIMIZERS)
    momentum: float = setting(0.9, ge=0.0, lt=1.0)
    seed: int = 0
    logit_adjust: bool = True
    proximal_mu: float = setting(0.0, ge=0.0)
    trainable: str = setting("all", choices=TRAINABLE)


PROMPTS = ("tight", "whole")
"""Box prompts segmentation trains with (``SegmentationConfig.prompt``); see
``models.segmentation.BOX_MODES``."""
MAX_BOX_SHIFT = 128
"""Largest training box jitter (pixels of the 256 grid): half the grid."""
MAX_SLICES_PER_CASE = 512
"""Most slices per case a segmentation round may ask a hospital to embed and train on."""


@dataclass
class SegmentationConfig:
    """How hospitals train and score a segmentation backbone (``litemedsam``); ignored for a
    classifier. The backbone decides the task type: a study whose ``model.backbone`` is a
    segmentation backbone is a segmentation study (``models.registry.BackboneSpec.task``).

    Attributes:
        prompt: the box prompts training uses: ``tight`` (the box around each slice's
            foreground, jittered by up to ``box_shift`` pixels a side) or ``whole`` (the whole
            slice: the automatic mode, no human prompt). Evaluation reports both.
        box_shift: training jitter, in pixels of the 256 x 256 model grid: each box side moves
            outward by a uniform 0..box_shift (MedSAM's ``bbox_shift`` is 20).
        train_slices_per_case: foreground slices per training case (evenly spaced; 0: every
            slice holding foreground). Each new slice costs one image-encoder run at the
            hospital the first time (then it is cached).
        eval_slices_per_case: foreground slices per validation case scored in 3D Dice and
            HD95 (evenly spaced; 0: every slice holding foreground).
    """

    prompt: str = setting("tight", choices=PROMPTS)
    box_shift: int = setting(20, ge=0, le=MAX_BOX_SHIFT)
    train_slices_per_case: int = setting(0, ge=0, le=MAX_SLICES_PER_CASE)
    eval_slices_per_case: int = setting(0, ge=0, le=MAX_SLICES_PER_CASE)


def round_lr(config: TrainConfig, server_round: int) -> float:
    """Learning rate of round ``server_round`` (1-based) under the per-round decay."""
    return config.lr * config.lr_decay ** max(0, server_round - 1)


def _key(name: str) -> str:
    return name.replace("_", "-")


def to_config_record(*configs: ModelConfig | TrainConfig | SegmentationConfig) -> ConfigRecord:
    """Flatten configs into one ConfigRecord (``lora_r`` -> ``"lora-r"``)."""
    record = ConfigRecord()
    for config in configs:
        for f in fields(config):
            record[_key(f.name)] = getattr(config, f.name)
    return record


WIRE = "the coordinator's message"
"""How a refused wire value's message names where it came from."""


def from_config_record(cls: type[T], record: ConfigRecord) -> T:
    """Read one config back from a ConfigRecord, checked by the reader that checks the study
    file: a message is held to the same types and limits as the file it came from.

    Raises:
        KeyError: a key is missing (a protocol error: another medfed version's coordinator).
        core.settings.SettingsError: a value of the wrong type or out of its limits, named
            by its wire key (``lora-r = 0: must be >= 1``).
    """
    values = {}
    for f in fields(cls):
        key = _key(f.name)
        if key not in record:
            raise KeyError(f"{WIRE} has no '{key}' in its config record")
        value = record[key]
        values[key] = list(value) if isinstance(value, list) else value
    return load_settings(cls, values, WIRE)
