"""MedMNIST-format datasets for simulations: find the ``.npz``, or download and MD5-check it.

Search order: ``$MEDFED_DATA_DIR``, ``../shared/data`` next to the checkout (and next to the
current directory), then the user cache ``~/.cache/medfed/medmnist``; when none has the file, the
official MedMNIST v2 release on Zenodo (record 10519652) is tried.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import MedfedError
from models.data import ImageSet, middle_slices, to_image_tensor, to_volume_tensor

logger = logging.getLogger(__name__)

DOWNLOAD_URL = "https://zenodo.org/records/10519652/files/{name}.npz"
# MD5s recorded by the medmnist package (3.0.2, medmnist/info.py) for the 28 px files.
KNOWN_MD5 = {
    "pneumoniamnist": "28209eda62fecd6e6a2d98b1501bb15f",
    "breastmnist": "750601b1f35ba3300ea97c75c52ff8f6",
    "adrenalmnist3d": "bbd3c5a5576322bc4cdfea780653b1ce",
}
SPLITS = ("train", "val", "test")
MIDDLE_SLICES = "-midslices"
"""Suffix of a 3D dataset's name that loads each volume as its three orthogonal middle slices
(``adrenalmnist3d-midslices``): the 2D backbone's view of the same study."""

MASKS_AS_TISSUE = "-tissue"
"""Suffix of a 3D mask dataset's name that reads its masks as fat outside and soft tissue
inside (``models.volume_transforms.masks_as_tissue``) instead of air and +1000 HU."""

CLASS_NAMES = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal or benign"],
}
"""Class names of the MedMNIST datasets medfed's simulations name (label order)."""


class DatasetError(MedfedError, ValueError):
    """A dataset file that is not a usable MedMNIST-format archive; the message names it."""


def class_names(dataset: str, num_classes: int) -> list[str]:
    """The dataset's class names, or ``class 0``, ``class 1``... where medfed knows none."""
    names = CLASS_NAMES.get(dataset, [])
    return names if len(names) == num_classes else [f"class {k}" for k in range(num_classes)]


def search_dirs() -> list[Path]:
    """Folders searched for ``<name>.npz``, in order."""
    dirs = []
    if env := os.environ.get("MEDFED_DATA_DIR"):
        dirs.append(Path(env))
    checkout = Path(__file__).resolve().parent.parent
    dirs += [checkout.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    dirs.append(Path.home() / ".cache" / "medfed" / "medmnist")
    return dirs


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_medmnist(name: str, target_dir: Path) -> Path:
    """Download ``<name>.npz`` from the official release and check its MD5 before keeping it."""
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{name}.npz"
    partial = target.with_suffix(".npz.part")
    url = DOWNLOAD_URL.format(name=name)
    logger.info("downloading %s from %s", name, url)
    urllib.request.urlretrieve(url, partial)
    expected = KNOWN_MD5.get(name)
    if expected and (actual := _md5(partial)) != expected:
        partial.unlink()
        raise OSError(f"{url}: MD5 {actual} does not match the published {expected}; not kept")
    partial.replace(target)
    return target


def find_medmnist(name: str, download: bool = True) -> Path:
    """Path of ``<name>.npz`` (e.g. ``pneumoniamnist``), downloading it when allowed and missing."""
    for directory in search_dirs():
        candidate = directory / f"{name}.npz"
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(d) for d in search_dirs())
    if not download:
        raise FileNotFoundError(f"{name}.npz is in none of: {tried}. Set MEDFED_DATA_DIR.")
    try:
        return download_medmnist(name, search_dirs()[-1])
    except OSError as err:
        raise FileNotFoundError(
            f"{name}.npz is in none of: {tried}, and downloading it failed ({err}). "
            "Put the file in one of those folders or set MEDFED_DATA_DIR."
        ) from err


@dataclass
class MedMNIST:
    """A MedMNIST-format dataset, resized for the backbone.

    Attributes:
        name: dataset name (file stem).
        splits: ``train``, ``val`` and ``test`` image sets.
        num_classes: number of classes (from the labels of all splits).
    """

    name: str
    splits: dict[str, ImageSet]
    num_classes: int


def load_medmnist(name: str, image_size: int, path: Path | None = None) -> MedMNIST:
    """Load a MedMNIST-format ``.npz`` at ``image_size`` pixels.

    2D files give ``(N, C, S, S)`` images; 3D files (``adrenalmnist3d``) give ``(N, 1, S, S, S)``
    volumes, or with the ``-midslices`` suffix ``(N, 3, S, S)`` images of each volume's three
    orthogonal middle slices.

    Args:
        name: dataset name, e.g. ``pneumoniamnist``.
        image_size: side in pixels (voxels) the images (volumes) are resized to.
        path: a specific file; default is :func:`find_medmnist`.
    """
    tissue = name.endswith(MASKS_AS_TISSUE)
    slices = name.removesuffix(MASKS_AS_TISSUE).endswith(MIDDLE_SLICES)
    path = path or find_medmnist(name.removesuffix(MASKS_AS_TISSUE).removesuffix(MIDDLE_SLICES))
    with np.load(path) as archive:
        missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")
                   if f"{s}_{k}" not in archive]
        if missing:
            raise DatasetError(f"{path}: not a MedMNIST-format file, it lacks {missing}")
        raw = {s: (archive[f"{s}_images"], archive[f"{s}_labels"]) for s in SPLITS}
    volumes = raw["train"][0].ndim == 4 and raw["train"][0].shape[-1] != 3
    if slices and not volumes:
        raise DatasetError(f"{path}: '{MIDDLE_SLICES}' needs a 3D dataset")
    for split, (_, labels) in raw.items():
        if labels.ndim == 2 and labels.shape[1] > 1:
            raise DatasetError(f"{path}: {split} labels have shape {labels.shape}: multi-label")

    def convert(x: np.ndarray) -> torch.Tensor:
        if slices:
            return to_image_tensor(middle_slices(x), image_size)
        if volumes and tissue:
            from models.volume_transforms import masks_as_tissue

            return masks_as_tissue(to_volume_tensor(x, image_size))
        return to_volume_tensor(x, image_size) if volumes else to_image_tensor(x, image_size)

    splits = {s: ImageSet(convert(x), torch.from_numpy(y.reshape(-1)).long())
              for s, (x, y) in raw.items()}
    num_classes = int(max(int(s.labels.max()) for s in splits.values()) + 1)
    return MedMNIST(name=name, splits=splits, num_classes=num_classes)
