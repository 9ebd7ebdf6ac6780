"""What a model's input is made of: the preprocessing an adapter card pins.

One description for the coordinator that publishes an adapter and the hospital that runs it
(``inference``): the image size, the backbone's channels and normalisation, which frames are
read, and the decoding pipeline's settings (:func:`imaging.transforms.transform_settings`, or
for a volume :func:`models.volume_transforms.volume_settings`). When this code's pipeline
changes (its version bumps), an adapter trained before no longer matches and prediction
refuses it.
"""

from __future__ import annotations

import json

from torch import nn

from imaging.segmentation import CLIP_PERCENTILES, SLICE_AXIS
from imaging.transforms import transform_settings
from models import litemedsam
from models.card import Preprocessing
from models.classifier import ImageClassifier
from models.config import ModelConfig
from models.registry import backbone_spec
from models.volume_transforms import volume_settings

IMAGE_FRAMES = "middle"
"""Frames a prediction reads from a multi-frame file or series folder: one image per study."""


def _scalar(value: object) -> str | int:
    """A pipeline setting as a card holds it: whole numbers and strings as they are, anything
    else as its JSON text."""
    if isinstance(value, int | str) and not isinstance(value, bool):
        return value
    return json.dumps(value, sort_keys=True)


def _buffer(model: nn.Module, name: str) -> list[float]:
    """A normalisation buffer (``mean``/``std``) of the :class:`ImageClassifier` inside
    ``model``, flattened; empty when there is none (the CT encoder scales Hounsfield units
    itself)."""
    for module in model.modules():
        if isinstance(module, ImageClassifier):
            return [float(v) for v in getattr(module, name).flatten().tolist()]
    return []


def describe_preprocessing(config: ModelConfig, model: nn.Module) -> Preprocessing:
    """The preprocessing of ``model`` (a base model or its peft wrapper) built from ``config``.

    Returns:
        A :class:`models.card.Preprocessing`: ``image_size`` pixels a side, 3 channels for an
        image backbone (grayscale repeated) or 1 for a volume, per-channel mean/std applied
        to [0, 1] inputs, and the pixel pipeline's settings.
    """
    if backbone_spec(config.backbone).task == "segmentation":
        return segmentation_preprocessing()
    volume = backbone_spec(config.backbone).spatial_dims == 3
    frames = "volume" if volume else IMAGE_FRAMES
    pixels = (volume_settings(config.image_size, None) if volume
              else transform_settings(config.image_size, frames))
    return Preprocessing(
        image_size=config.image_size, spatial_dims=3 if volume else 2,
        channels=1 if volume else 3, frames=frames,
        mean=_buffer(model, "mean"), std=_buffer(model, "std"),
        pixels={k: _scalar(v) for k, v in pixels.items()})


SEGMENTATION_PIPELINE_VERSION = 1
"""Bump when the segmentation input pipeline changes (adapters trained before are refused)."""


def segmentation_preprocessing() -> Preprocessing:
    """The preprocessing of a LiteMedSAM segmentation adapter (``models.segmentation``).

    Returns:
        A :class:`models.card.Preprocessing`: 256-pixel square 2D slices, 3 channels (the
        slice repeated), no mean/std (inputs in [0, 1]), the whole volume read (``frames``
        ``volume``); ``pixels`` names the volume's intensity scaling
        (``imaging.segmentation.normalise_intensity``: percentile clip of nonzero voxels, then
        [0, 1]), the slicing axis of a NIfTI array and MedSAM's per-slice input convention
        (``models.litemedsam.PREPROCESSING``).
    """
    pixels = {"version": SEGMENTATION_PIPELINE_VERSION,
              "intensity": f"nonzero-percentile-clip-{CLIP_PERCENTILES[0]:g}-"
                           f"{CLIP_PERCENTILES[1]:g},minmax01",
              "nifti_slice_axis": SLICE_AXIS, "dicom_slices": "acquired-plane",
              "slice_input": litemedsam.PREPROCESSING}
    return Preprocessing(image_size=litemedsam.IMAGE_SIZE, spatial_dims=2, channels=3,
                         frames="volume", mean=[], std=[], pixels=pixels)
