"""Decoded pixel values to what the backbone expects: ``(C, S, S)`` float32 in [0, 1].

MONAI transforms do the work: a resize (area averaging when shrinking), then intensity scaling
to [0, 1] (grayscale with a VOI window or LUT: its output range, as a viewer shows it; grayscale
without one: the resized image's own minimum and maximum; colour: the stored bit depth). The
settings that change the output are in :func:`transform_settings`, which also keys the cache.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from monai.transforms import Compose, Resize, ScaleIntensity, ScaleIntensityRange

from imaging.dicom import DecodedImage, DicomReadError

TRANSFORM_VERSION = 3
"""Bump when the pipeline changes, so that old cache entries no longer match."""


def transform_settings(image_size: int, frames: str) -> dict[str, object]:
    """Everything that decides the transformed pixels besides the file's bytes."""
    return {"version": TRANSFORM_VERSION, "image_size": image_size, "frames": frames,
            "resize": "area-down/bilinear-up", "scale": "voi-range|minmax-gray/bits-rgb"}


@lru_cache(maxsize=32)
def _pipelines(image_size: int, value_range: tuple[float, float] | None,
               shrink: bool) -> Compose:
    # Shrinking: area averaging, which is antialiased and ~25x faster than MONAI's Gaussian
    # anti_aliasing on a 512 px CT; enlarging: bilinear.
    resize = Resize(spatial_size=(image_size, image_size), mode="area" if shrink else "bilinear",
                    dtype=np.float32)
    if value_range is not None:
        scale = ScaleIntensityRange(a_min=value_range[0], a_max=value_range[1], b_min=0.0,
                                    b_max=1.0, clip=True)
    else:
        scale = ScaleIntensity(minv=0.0, maxv=1.0)
    # Resize first: scaling is linear (the window already clipped), so the order does not change
    # the result, and the cold path then scales the small image's pixels, not the file's.
    return Compose([resize, scale])


def to_model_input(decoded: DecodedImage, image_size: int) -> np.ndarray:
    """``(F, C, image_size, image_size)`` float32 in [0, 1], one entry per kept frame.

    Raises:
        DicomReadError: a grayscale frame holds a single value (nothing to learn from; usually
            a broken Rescale Slope such as 0).
    """
    known_range = (0.0, decoded.rgb_max) if decoded.rgb_max else decoded.value_range
    shrink = min(decoded.frames.shape[-2:]) > image_size
    pipeline = _pipelines(image_size, known_range, shrink)
    out = []
    for frame in decoded.frames:
        if not decoded.rgb_max and float(frame.max()) == float(frame.min()):
            raise DicomReadError(
                "bad-values", f"every pixel has the value {float(frame.min()):g} after Rescale "
                "Slope/Intercept and the VOI window: check those attributes in the export")
        image = np.asarray(pipeline(frame), dtype=np.float32)
        np.clip(image, 0.0, 1.0, out=image)
        out.append(1.0 - image if decoded.invert else image)
    return np.stack(out).astype(np.float32, copy=False)
