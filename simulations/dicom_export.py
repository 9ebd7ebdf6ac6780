"""Simulated hospitals as real sites: each partition written as DICOM files plus a manifest.

The files are valid DICOM Part 10 (Secondary Capture, fresh UIDs from
``pydicom.uid.generate_uid``, a modality, pseudonymous patient ids), so the simulated hospitals
read them through ``client.data`` exactly as a real hospital reads its PACS export.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from client.site import SiteData
from models.data import ImageSet

logger = logging.getLogger(__name__)

MANIFEST = "manifest.csv"


def dicom_dataset(pixels: np.ndarray, patient_id: str, modality: str = "DX",
                  study_uid: str | None = None, series_uid: str | None = None,
                  instance: int = 1, full_range_window: bool = False) -> Dataset:
    """A Secondary Capture DICOM dataset holding ``pixels``.

    Args:
        pixels: ``(H, W)`` uint8/uint16 grayscale (MONOCHROME2), ``(H, W, 3)`` uint8 RGB, or
            ``(F, H, W)`` for a multi-frame grayscale image.
        patient_id: pseudonymous patient id.
        modality: DICOM modality code (``DX``, ``CT``, ``MR``, ``OT``...).
        full_range_window: grayscale only: add a LINEAR_EXACT VOI window over the whole stored
            range, so readers map stored values v to v / max exactly (no contrast stretch).
    """
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"pixels must be uint8 or uint16, got {pixels.dtype}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_id
    ds.Modality = modality
    ds.ConversionType = "WSD"
    ds.StudyDate = dt.date.today().strftime("%Y%m%d")
    ds.InstanceNumber = instance
    rgb = pixels.ndim == 3 and pixels.shape[-1] == 3 and pixels.dtype == np.uint8
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    elif pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if full_range_window and not rgb:
        top = float(2**bits - 1)
        ds.VOILUTFunction = "LINEAR_EXACT"
        ds.WindowCenter = top / 2
        ds.WindowWidth = top
    ds.PixelData = pixels.tobytes()
    return ds


def export_site(site: SiteData, folder: Path, hospital: int, classes: Sequence[str] = (),
                modality: str = "DX") -> Path:
    """Write one hospital's train and val images as DICOM files and a manifest; returns it.

    Each image gets its own pseudonymous patient (``H<hospital>-P<n>``); the manifest keeps the
    simulation's split in its ``split`` column so both code paths train on the same images.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    number = 0
    for split, images in (("train", site.train), ("val", site.val)):
        for image, label in _as_uint8(images):
            number += 1
            patient = f"H{hospital}-P{number:06d}"
            name = f"images/{patient}.dcm"
            dicom_dataset(image, patient, modality, full_range_window=True).save_as(
                folder / name, enforce_file_format=True)
            rows.append({"path": name, "label": classes[label] if classes else label,
                         "patient_id": patient, "split": split})
    manifest = folder / MANIFEST
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "patient_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    logger.info("hospital %d: %d DICOM files in %s", hospital, number, folder)
    return manifest


def _as_uint8(images: ImageSet):
    # (N, C, S, S) floats in [0, 1] -> uint8 (S, S) or (S, S, 3); exact for MedMNIST's 8 bits.
    array = (images.images.numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    for image, label in zip(array, images.labels.tolist(), strict=True):
        yield (image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)), int(label)


def export_hospitals(sites: Sequence[SiteData], root: Path,
                     classes: Sequence[str] = ()) -> list[Path]:
    """Every hospital's partition under ``root/hospital-<k>/``; returns the manifests."""
    return [export_site(site, Path(root) / f"hospital-{k}", k, classes)
            for k, site in enumerate(sites)]
