"""Simulated CT volumes as real sites see them: one multi-file DICOM series per volume.

A volume in [0, 1] (the encoder's input scale) becomes Hounsfield units in [-1000, 1000],
stored as uint16 with ``RescaleIntercept`` -1024, one single-frame file per axial slice with
``ImagePositionPatient``, ``ImageOrientationPatient`` and ``PixelSpacing``, so that
``imaging.volumes`` reads it back (to [0, 1] within one HU) as a hospital reads a PACS
export. Voxel axes (I, J, K) of the array run along R, A and S.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from client.site import SiteData
from models.volume_transforms import HU_MAX, HU_MIN
from simulations.dicom_export import MANIFEST, dicom_dataset

logger = logging.getLogger(__name__)

INTERCEPT = -1024.0


def series_datasets(volume: np.ndarray, patient_id: str,
                    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
                    instance_order: Sequence[int] | None = None) -> list[Dataset]:
    """One CT dataset per axial slice of ``volume``.

    Args:
        volume: ``(I, J, K)`` floats in [0, 1], axes along R, A, S.
        patient_id: pseudonymous patient id.
        spacing: voxel size in mm along I, J, K.
        instance_order: ``InstanceNumber`` of each slice (default 1..K); positions, not these
            numbers, order the slices when read.
    """
    hu = HU_MIN + np.clip(volume, 0.0, 1.0) * (HU_MAX - HU_MIN)
    stored = np.round(hu - INTERCEPT).astype(np.uint16)
    study, series = generate_uid(), generate_uid()
    order = list(instance_order) if instance_order is not None else range(1, hu.shape[2] + 1)
    out = []
    for k in range(hu.shape[2]):
        # Rows run along J (anterior), columns along I (right): pixel[j, i] = volume[i, j, k].
        ds = dicom_dataset(np.ascontiguousarray(stored[:, :, k].T), patient_id, "CT",
                           study_uid=study, series_uid=series, instance=int(order[k]))
        # DICOM's patient space is LPS: +R is -x, +A is -y.
        ds.ImageOrientationPatient = [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, float(k * spacing[2])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.RescaleIntercept = INTERCEPT
        ds.RescaleSlope = 1.0
        ds.RescaleType = "HU"
        out.append(ds)
    return out


def write_series(volume: np.ndarray, folder: Path, patient_id: str,
                 spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Path:
    """Write ``volume`` as a series folder (``slice-<k>.dcm``); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, ds in enumerate(series_datasets(volume, patient_id, spacing)):
        ds.save_as(folder / f"slice-{k:04d}.dcm", enforce_file_format=True)
    return folder


def export_volume_site(site: SiteData, folder: Path, hospital: int) -> Path:
    """One hospital's train and val volumes as series folders plus a manifest; returns it."""
    rows = []
    number = 0
    for split, data in (("train", site.train), ("val", site.val)):
        for volume, label in zip(data.images[:, 0].numpy(), data.labels.tolist(), strict=True):
            number += 1
            patient = f"H{hospital}-P{number:06d}"
            write_series(volume, folder / "volumes" / patient, patient)
            rows.append({"path": f"volumes/{patient}", "label": int(label),
                         "patient_id": patient, "split": split})
    manifest = folder / MANIFEST
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "patient_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    logger.info("hospital %d: %d CT series in %s", hospital, number, folder)
    return manifest
