"""A hospital's own data as local training sees it: a train and a validation image set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context

from client.data.config import SiteDataConfig
from client.data.config import from_node_config as site_data_from_node_config
from client.data.dataset import load_manifest_site as load_manifest_site_sets
from models.data import ImageSet, to_image_tensor


@dataclass
class SiteData:
    """Training and validation images of one hospital; never leaves the hospital.

    ``info`` is what the hospital may tell the coordinator about its data: the dataset
    fingerprint and counts (see ``client.data.SiteReport.shareable``), never ids or paths.
    ``classes``: the names of its labels ``0, 1, ...`` (empty: labels are the study's indices).
    """

    train: ImageSet
    val: ImageSet
    info: dict[str, int | str] = field(default_factory=dict)
    classes: tuple[str, ...] = ()


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


def load_manifest_site(manifest: Path, config: SiteDataConfig, image_size: int) -> SiteData:
    """A hospital's DICOM files listed in a CSV manifest, checked (see ``client.data``)."""
    sets, report = load_manifest_site_sets(manifest, config, image_size)
    return SiteData(train=sets["train"], val=sets["val"], info=report.shareable(),
                    classes=tuple(config.classes))


def load_site_from_node_config(context: Context, image_size: int) -> SiteData:
    """The hospital daemon's data, named by its node config.

    ``manifest = "/path/manifest.csv"`` (DICOM files; settings from ``classes``, ``site-config``
    and ``site-*`` keys, see ``client.data.config.from_node_config``), or
    ``data-npz = "/path/site.npz"`` (MedMNIST-format arrays).
    """
    node_config = context.node_config
    if "manifest" in node_config:
        return load_manifest_site(Path(str(node_config["manifest"])),
                                  site_data_from_node_config(node_config), image_size)
    if "data-npz" not in node_config:
        raise KeyError("this hospital's node config has neither 'manifest' nor 'data-npz': set "
                       "one of them to the site's data")
    return load_npz_site(Path(str(node_config["data-npz"])), image_size)
