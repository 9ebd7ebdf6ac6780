"""CT volumes to the CT encoder's input, as MONAI transforms.

Merlin's convention: RAS orientation, Hounsfield units clipped to [-1000, 1000] and scaled to
[0, 1]. Here the volume is then resized to the run's cube (``S x S x S`` voxels), optionally
after resampling to a physical spacing first. The encoder itself permutes ``(1, H, W, D)`` to
``(D, H, W)`` and repeats it to 3 channels (``models.ct_encoder.CTVolumeClassifier``).
"""

from __future__ import annotations

import numpy as np
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
