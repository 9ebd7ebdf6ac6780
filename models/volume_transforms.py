"""CT volumes to the CT encoder's input, as MONAI transforms.

Merlin's convention: RAS orientation, Hounsfield units clipped to [-1000, 1000] and scaled to
[0, 1]. Here the volume is then resized to the run's cube (``S x S x S`` voxels), optionally
after resampling to a physical spacing first. The encoder itself permutes ``(1, H, W, D)`` to
``(D, H, W)`` and repeats it to 3 channels (``models.ct_encoder.CTVolumeClassifier``).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import Compose, Orientation, Resize, ScaleIntensityRange, Spacing

HU_MIN = -1000.0
HU_MAX = 1000.0
MERLIN_SPACING = (1.5, 1.5, 3.0)
"""Voxel spacing (mm) Merlin was trained at (224 x 224 x 160 voxels)."""
TRANSFORM_VERSION = 1
"""Bump when the pipeline changes, so cached volumes no longer match."""


def volume_settings(size: int, pixdim: tuple[float, float, float] | None) -> dict[str, object]:
    """Everything besides the file's bytes that decides the transformed volume (a cache key)."""
    return {"volume-version": TRANSFORM_VERSION, "size": size, "orientation": "RAS",
            "pixdim": list(pixdim) if pixdim else None, "hu": [HU_MIN, HU_MAX],
            "resize": "trilinear"}


def ct_volume_transform(size: int, pixdim: tuple[float, float, float] | None = None) -> Compose:
    """``(1, H, W, D)`` HU MetaTensor with its affine -> ``(1, size, size, size)`` in [0, 1].

    Args:
        size: side of the output cube in voxels.
        pixdim: resample to this spacing in mm first (e.g. :data:`MERLIN_SPACING`); None: resize
            the volume as it is (a small cube cannot hold Merlin's field of view anyway).
    """
    steps = [Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))]
    if pixdim is not None:
        steps.append(Spacing(pixdim=pixdim, mode="bilinear"))
    steps += [ScaleIntensityRange(a_min=HU_MIN, a_max=HU_MAX, b_min=0.0, b_max=1.0, clip=True),
              Resize(spatial_size=(size, size, size), mode="trilinear", dtype=np.float32)]
    return Compose(steps)


FAT_HU = -100.0
"""Hounsfield units of fat: what surrounds the adrenal glands in abdominal CT."""
SOFT_TISSUE_HU = 40.0
"""Hounsfield units of soft tissue such as an adrenal gland."""


def hu_to_unit(hu: float) -> float:
    """Hounsfield units -> the encoder's [0, 1] scale (-1000 -> 0, +1000 -> 1, clipped)."""
    return min(1.0, max(0.0, (hu - HU_MIN) / (HU_MAX - HU_MIN)))


def masks_as_tissue(volumes: torch.Tensor, background_hu: float = FAT_HU,
                    mask_hu: float = SOFT_TISSUE_HU) -> torch.Tensor:
    """Shape masks in [0, 1] (0 outside, 1 inside) -> CT-like intensities on the encoder's scale.

    A data-specific choice for mask datasets such as AdrenalMNIST3D: read as CT, a binary mask
    is air (0) and bone-bright +1000 HU (1), far from the abdominal CT the encoder learnt; here
    outside becomes ``background_hu`` and inside ``mask_hu``, linearly in between (so it commutes
    with the trilinear resize).

    Args:
        volumes: any shape, values in [0, 1].
        background_hu: HU of value 0 (default fat).
        mask_hu: HU of value 1 (default soft tissue).

    Returns:
        A new float32 tensor of the same shape in [0, 1].
    """
    low, high = hu_to_unit(background_hu), hu_to_unit(mask_hu)
    return (volumes.float() * (high - low) + low).clamp_(0.0, 1.0)
