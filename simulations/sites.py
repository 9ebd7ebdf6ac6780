"""Simulated hospitals: each one's share of a MedMNIST training split, loaded lazily per process.

A Ray actor that serves several hospitals decodes the dataset once and keeps it; a hospital's
share is recomputed from the seed (cheap) instead of being shipped around.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import Context

from client.data.config import SiteDataConfig
from client.site import SiteData, load_manifest_site
from models.data import ImageSet
from simulations.config import DataConfig
from simulations.datasets import MedMNIST, load_medmnist
from simulations.partition import partition, train_val_split
from simulations.shift import shift_site


@lru_cache(maxsize=2)
def cached_dataset(name: str, image_size: int) -> MedMNIST:
    """The dataset at ``image_size`` px, decoded once per process."""
    return load_medmnist(name, image_size)


def training_pool(data: DataConfig, image_size: int, seed: int) -> ImageSet:
    """The training examples the simulation spreads over hospitals (maybe a seeded subset)."""
    return _training_pool(data.dataset, image_size, data.max_train_examples, seed)


@lru_cache(maxsize=2)
def _training_pool(dataset: str, image_size: int, max_train_examples: int, seed: int) -> ImageSet:
    train = cached_dataset(dataset, image_size).splits["train"]
    if 0 < max_train_examples < len(train):
        keep = np.sort(np.random.default_rng(seed).permutation(len(train))[:max_train_examples])
        train = train.subset(keep)
    return train


def held_out_test_set(data: DataConfig, image_size: int, seed: int) -> ImageSet:
    """The official test split (maybe a seeded subset): the coordinator's held-out set."""
    test = cached_dataset(data.dataset, image_size).splits["test"]
    if 0 < data.max_test_examples < len(test):
        import numpy as np

        keep = np.sort(np.random.default_rng(seed + 1).permutation(len(test))[
            : data.max_test_examples])
        test = test.subset(keep)
    return test


@lru_cache(maxsize=4)
def _shares(data: DataConfig, image_size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each hospital's (train, validation) indices into the training pool (cheap: indices)."""
    pool = training_pool(data, image_size, seed)
    shares = partition(pool.labels.numpy(), data.num_hospitals, data.partition, data.alpha, seed,
                       data.size_distribution, data.size_skew)
    return [train_val_split(indices, data.val_fraction, seed + 7919 * hospital)
            for hospital, indices in enumerate(shares)]


def hospital_site(data: DataConfig, image_size: int, seed: int, hospital: int) -> SiteData:
    """One simulated hospital's train/validation data, built on its own (nothing for the others).
    """
    pool = training_pool(data, image_size, seed)
    train_idx, val_idx = _shares(data, image_size, seed)[hospital]
    train, val = pool.subset(train_idx), pool.subset(val_idx)
    # This hospital's scanner (seeded); the coordinator's test set is left as is.
    train = shift_site(train, data.shift, hospital, seed, data.shift_strength)
    val = shift_site(val, data.shift, hospital, seed + 1, data.shift_strength)
    return SiteData(train=train, val=val)


def hospital_sites(data: DataConfig, image_size: int, seed: int) -> list[SiteData]:
    """Every simulated hospital's train/validation data, in hospital order."""
    return [hospital_site(data, image_size, seed, k) for k in range(data.num_hospitals)]


@dataclass(frozen=True)
class SimulatedSiteLoader:
    """``SiteLoader`` for the ClientApp: the hospital named by the node's ``partition-id``.

    With ``dicom_root`` (``--as-dicom``) the hospital reads ``<dicom_root>/hospital-<k>/
    manifest.csv`` and its DICOM files through ``client.data``, as a real site does.
    """

    data: DataConfig
    seed: int
    dicom_root: str = ""
    frames: str = "middle"

    def __call__(self, context: Context, image_size: int) -> SiteData:
        hospital = int(context.node_config["partition-id"])
        if self.dicom_root:
            root = Path(self.dicom_root)
            config = SiteDataConfig(cache_dir=str(root / "cache"), max_error_fraction=0.0,
                                    frames=self.frames)
            return load_manifest_site(root / f"hospital-{hospital}" / "manifest.csv", config,
                                      image_size)
        return _site(self.data, image_size, self.seed, hospital)


# A Ray actor serves many hospitals in turn: it keeps the ones it has built (each a slice of
# the one decoded dataset, so memory stays bounded by the dataset) and builds the others lazily.
@lru_cache(maxsize=64)
def _site(data: DataConfig, image_size: int, seed: int, hospital: int) -> SiteData:
    return hospital_site(data, image_size, seed, hospital)


def simulated_site_loader(data: DataConfig, image_size: int, seed: int,
                          run_dir: str) -> SimulatedSiteLoader:
    """The simulation's ``SiteLoader``; with ``data.as_dicom`` it first writes every hospital's
    partition as DICOM files plus a manifest under ``<run_dir>/dicom``."""
    if not data.as_dicom:
        return SimulatedSiteLoader(data, seed)
    from simulations.dicom_export import export_hospitals

    root = (Path(run_dir) / "dicom").resolve()
    sites = hospital_sites(data, image_size, seed)
    if sites[0].train.images.ndim == 5:  # volumes: one CT series folder each
        from simulations.volume_export import export_volume_site

        for k, site in enumerate(sites):
            export_volume_site(site, root / f"hospital-{k}", k)
        return SimulatedSiteLoader(data, seed, str(root), frames="volume")
    export_hospitals(sites, root)
    return SimulatedSiteLoader(data, seed, str(root))
