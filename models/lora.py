"""LoRA on a registered backbone with peft: only the adapter and the task head train."""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from models import litemedsam
from models.config import ModelConfig
from models.ct_encoder import expand_targets
from models.efficientnet_lite import LITE0_PRESETS
from models.registry import (
    SEGMENTATION_BACKBONE,
    backbone_spec,
    build_base_model,
    verify_weights,
)
from models.segmentation import build_segmenter

LORA_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def resolve_targets(model: nn.Module, names: list[str]) -> list[str]:
    """Full names of the layers LoRA can wrap whose own name is one of ``names``.

    A name is a layer's own name (``conv1``) or the end of its dotted path
    (``layer4.0.conv1``); presets are expanded before (:func:`expand_presets`). Resolving names
    to layers ourselves skips same-named placeholders (MONAI's first block has an
    ``nn.Identity`` as ``_expand_conv``) and turns a typo into an error instead of no adapter.
    """
    found = [
        full
        for full, module in model.named_modules()
        if isinstance(module, LORA_LAYER_TYPES) and (
            full.rsplit(".", 1)[-1] in names or any(full.endswith(f".{n}") for n in names))
    ]
    if not found:
        raise ValueError(f"no Linear/Conv layer is named any of {names}: LoRA would wrap nothing")
    return found


def expand_presets(names: list[str]) -> list[str]:
    """LoRA target entries with presets replaced by module names: EfficientNet-Lite0's
    ``late-pointwise`` / ``all-pointwise`` (:data:`models.efficientnet_lite.LITE0_PRESETS`) and
    the CT encoder's stage presets such as ``layer3-last6+layer4``."""
    out: list[str] = []
    for name in names:
        out += LITE0_PRESETS.get(name, [name])
    return expand_targets(out)


def lora_config(config: ModelConfig, model: nn.Module) -> LoraConfig:
    """peft's LoraConfig for a run: the run's targets, or the backbone's defaults."""
    spec = backbone_spec(config.backbone)
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=resolve_targets(
            model, expand_presets(list(config.lora_targets or spec.default_targets))),
        modules_to_save=[spec.head, *spec.saved],
    )


def build_lora_model(config: ModelConfig, verify: bool = True) -> PeftModel:
    """Pretrained backbone + new head, wrapped by peft; the frozen backbone never trains.

    A segmentation backbone (``litemedsam``) gets LoRA on its mask decoder
    (``models.segmentation.build_segmenter``): no head, ``lora_dropout`` unused.

    Args:
        config: the run's model settings.
        verify: check the local base weights against ``config.weights_sha256`` first.
    """
    if verify:
        verify_weights(config)
    if backbone_spec(config.backbone).task == "segmentation":
        # Box-prompted segmentation: LoRA on the mask decoder only (no head, no dropout).
        return build_segmenter(config.lora_r, config.lora_alpha,
                               tuple(config.lora_targets) or litemedsam.LORA_TARGETS,
                               pretrained=config.backbone == SEGMENTATION_BACKBONE)
    base = build_base_model(config)
    return get_peft_model(base, lora_config(config, base))


def freeze_batchnorm(model: nn.Module) -> None:
    """Keep every BatchNorm on its pretrained running statistics, also while training.

    Hospitals see different intensity distributions: statistics updated locally would drift apart
    and the coordinator would evaluate with yet others. Frozen, every hospital and the coordinator
    run the same normalisation, and only the exchanged adapter differs.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
