"""A predicted mask as a DICOM Segmentation (SEG) object that references its source series.

Written with highdicom: one binary segment (the card's structure, e.g. ``hippocampus``,
SNOMED CT coded when SNOMED has the name, else a private ``99MEDFED`` code), one frame per
source slice (empty frames kept; highdicom orders the frames by position, and each frame names
its source image and position), the series in the Referenced Series Sequence, and the
algorithm identified as medfed with the adapter's study, SHA-256 and base model. The SEG
carries the source's patient and study attributes (a PACS files it with the study); nothing
else written by ``medfed predict`` does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from core.errors import MedfedError
from models.card import AdapterCard

# highdicom logs each module it copies from the source at INFO: a dozen lines per study.
logging.getLogger("highdicom").setLevel(logging.WARNING)

PRIVATE_SCHEME = "99MEDFED"
"""Coding scheme of a structure SNOMED CT's dictionary has no name for."""
SEG_SERIES_NUMBER = 900
"""Series number of the SEG (the source's series numbers are often empty in exports)."""
PROMPT = "whole slice as the box (automatic mode)"
TYPE2_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
"""Patient and study attributes a SEG must carry, possibly empty (DICOM Type 2)."""


class SegWriteError(MedfedError, ValueError):
    """The source series lacks what a DICOM SEG needs; the message says what."""


def structure_code(name: str) -> Code:
    """The SNOMED CT code of a structure name (``hippocampus`` -> 5366008), or a private one."""
    key = "".join(part.capitalize() for part in name.replace("-", " ").replace("_", " ").split())
    try:
        return getattr(codes.SCT, key)
    except AttributeError:
        return Code(value=name[:16], scheme_designator=PRIVATE_SCHEME, meaning=name[:64])


def algorithm(card: AdapterCard, version: str) -> hd.AlgorithmIdentificationSequence:
    """medfed and the adapter, as the SEG's algorithm identification."""
    adapter = card.adapter_files.get("adapter_model.safetensors", "")
    return hd.AlgorithmIdentificationSequence(
        name=f"medfed {card.study}"[:64], family=codes.cid7162.ArtificialIntelligence,
        version=version[:64], source="medfed federated LoRA adapter",
        parameters={"adapter_sha256": adapter, "base_model": card.model.backbone,
                    "weights_sha256": card.model.weights_sha256,
                    "published_round": str(card.published_round), "prompt": PROMPT})


def write_dicom_seg(source: list[Dataset], mask: np.ndarray, card: AdapterCard, version: str,
                    path: Path) -> Path:
    """Write a SEG of a ``(K, rows, columns)`` boolean mask over the ``K`` source slices (in
    the same order) to ``path``; returns it."""
    if mask.shape[0] != len(source):
        raise ValueError(f"{mask.shape[0]} mask slices for {len(source)} source images")
    for ds in source:
        # Exports often leave Type 2 attributes out; DICOM allows them empty, highdicom needs
        # them present. Only these in-memory headers change, never the source files.
        for keyword in TYPE2_ATTRIBUTES:
            if keyword not in ds:
                setattr(ds, keyword, "")
    label = card.classes[1]
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label[:64],
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=structure_code(label),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm(card, version),
        tracking_uid=hd.UID(), tracking_id=f"medfed {label}"[:64])
    try:
        seg = _segmentation(source, mask, description, card, version, label)
    except (ValueError, AttributeError, TypeError) as err:
        raise SegWriteError(f"the series cannot carry a DICOM SEG ({err}); the NIfTI mask "
                            "was written") from err
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def _segmentation(source: list[Dataset], mask: np.ndarray,
                  description: hd.seg.SegmentDescription, card: AdapterCard, version: str,
                  label: str) -> hd.seg.Segmentation:
    """highdicom's SEG object for the checked inputs."""
    return hd.seg.Segmentation(
        source_images=source, pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="medfed", manufacturer_model_name="medfed predict",
        software_versions=version[:64],
        device_serial_number=card.adapter_files.get("adapter_model.safetensors", "")[:64],
        series_description=f"medfed {label} ({card.study})"[:64],
        content_label="MEDFED", omit_empty_frames=False)
