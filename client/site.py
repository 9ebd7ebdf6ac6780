"""A hospital's own data as local training sees it: a train and a validation image set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context

from models.data import ImageSet, to_image_tensor


@dataclass
class SiteData:
    """Training and validation images of one hospital; never leaves the hospital."""

    train: ImageSet
    val: ImageSet


SiteLoader = Callable[[Context, int], SiteData]
"""Gives a hospital's data for a run: ``(context, image_size) -> SiteData``."""


def load_npz_site(path: Path, image_size: int) -> SiteData:
    """A site folder's MedMNIST-format ``.npz`` (``train_*`` and ``val_*`` arrays)."""
    if not path.is_file():
        raise FileNotFoundError(f"site data file {path} does not exist: check 'data-npz'")
    with np.load(path) as archive:
        missing = [k for k in ("train_images", "train_labels", "val_images", "val_labels")
                   if k not in archive]
        if missing:
            raise KeyError(f"{path}: lacks {missing}; expected MedMNIST-format arrays")
        sets = {
            split: ImageSet(
                to_image_tensor(archive[f"{split}_images"], image_size),
                torch.from_numpy(archive[f"{split}_labels"].reshape(-1)).long(),
            )
            for split in ("train", "val")
        }
    return SiteData(train=sets["train"], val=sets["val"])


def load_site_from_node_config(context: Context, image_size: int) -> SiteData:
    """The hospital daemon's data, named by its node config (``data-npz = "/path/site.npz"``)."""
    if "data-npz" not in context.node_config:
        raise KeyError("this hospital's node config has no 'data-npz': set it to the site's data")
    return load_npz_site(Path(str(context.node_config["data-npz"])), image_size)
