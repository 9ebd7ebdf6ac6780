"""``medfed predict`` with a published LiteMedSAM segmentation adapter, on real hippocampus MRI:
NIfTI cases with masks (Dice and HD95 checked against an independent computation from the
files written, the mask on the image's exact grid, the masks equal to peft's own loading of
the adapter), a real DICOM series through the command in a subprocess (the DICOM SEG opened
with highdicom and pydicom), and every wrong pin refused before anything runs.

Cases are a few consecutive real slices (the encoder costs seconds a slice on this CPU); the
slice embeddings are cached in one folder for the module.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from published_segmenter import DATA, publish_segmenter, small_nifti_case, small_series
from scipy.ndimage import binary_erosion
from scipy.spatial import cKDTree

from imaging.settings import ReadSettings
from imaging.volumes import place_series, read_dicom_series
from inference.published import PinError, load_published
from inference.seg_studies import folder_segmentation_studies, manifest_segmentation_studies
from inference.segment import segment_studies, write_segmentation_summary
from models.adapters import ADAPTER_FILE
from models.card import CARD_FILE, read_card, write_card

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="no hippocampus data")
REPO = Path(__file__).resolve().parents[1]
CASES = ("hippocampus_004.nii.gz", "hippocampus_017.nii.gz")
SLICES = 3
CASE_SLICES = 2


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return publish_segmenter(tmp_path_factory.mktemp("published") / "adapter")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Two small real cases with masks, and a manifest naming them."""
    root = tmp_path_factory.mktemp("site")
    rows = ["image,mask,patient_id"]
    for k, case in enumerate(CASES):
        image, mask = small_nifti_case(case, root / "cases", CASE_SLICES)
        rows.append(f"cases/{image.name},cases/{mask.name},P{k}")
    (root / "labelled.csv").write_text("\n".join(rows) + "\n")
    return root


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv") as handle:
        return list(csv.DictReader(handle))


def _hd95(a: np.ndarray, b: np.ndarray, spacing: np.ndarray) -> float:
    """95th-percentile symmetric surface distance (mm), from scipy: each mask's boundary
    voxels, nearest boundary voxel of the other, the larger of the two directed percentiles."""
    def surface(mask: np.ndarray) -> np.ndarray:
        return np.argwhere(mask & ~binary_erosion(mask)) * spacing

    sa, sb = surface(a), surface(b)
    return max(np.percentile(cKDTree(sb).query(sa)[0], 95),
               np.percentile(cKDTree(sa).query(sb)[0], 95))


def _peft_masks(adapter: Path, image: Path, cache: Path) -> np.ndarray:
    """The adapter's masks on a case's slices through peft's own loader and medfed's training
    code (``make_slice_set`` + ``predict_masks`` in automatic mode)."""
    from peft import PeftModel

    from imaging.segmentation import normalise_intensity
    from models.litemedsam import build_litemedsam
    from models.segmentation import embedding_cache, make_slice_set, predict_masks

    model = PeftModel.from_pretrained(build_litemedsam(), adapter).eval()
    volume = normalise_intensity(nib.load(image).get_fdata(dtype=np.float32))
    slices = [torch.from_numpy(plane.copy()) for plane in volume]
    # make_slice_set needs a box per slice; automatic mode does not use it
    stand_in = [torch.ones_like(s, dtype=torch.bool) for s in slices]
    data = make_slice_set(model.get_base_model(), slices, stand_in, [0] * len(slices),
                          embedding_cache(cache))
    return torch.stack(predict_masks(model, data, "whole")).numpy()


def test_nifti_cases_are_scored_and_masks_keep_the_image_grid(adapter, site, cache, tmp_path):
    published = load_published(adapter, "cpu")
    source = manifest_segmentation_studies(site / "labelled.csv",
                                           ReadSettings().resolved_roots(site / "labelled.csv"))
    assert source.labelled and len(source.studies) == len(CASES)
    outcome = segment_studies(published, source, tmp_path, batch_size=2, cache_dir=cache)
    summary = write_segmentation_summary(published, source, outcome, tmp_path)
    rows = _rows(tmp_path)
    assert [r["error"] for r in rows] == ["", ""] and outcome.segmented == len(CASES)
    dice = []
    for row, study in zip(rows, source.studies, strict=True):
        image, truth_file = nib.load(study.image), nib.load(study.mask)
        written = nib.load(row["mask_nifti"])
        assert written.shape == image.shape
        assert np.array_equal(written.affine, image.affine)
        assert written.header.get_zooms() == image.header.get_zooms()
        assert int(written.header["sform_code"]) == int(image.header["sform_code"])
        predicted = np.asarray(written.dataobj) > 0
        truth = np.asarray(truth_file.dataobj) > 0
        assert int(row["voxels"]) == predicted.sum() > 0
        expected = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
        assert float(row["dice"]) == pytest.approx(expected, abs=1e-6)
        assert float(row["hd95_mm"]) == pytest.approx(
            _hd95(predicted, truth, np.array(image.header.get_zooms())), rel=1e-3)
        assert np.array_equal(predicted, _peft_masks(adapter, study.image, cache))
        dice.append(expected)
    assert summary["external_validation"]["mean_dice"] == pytest.approx(np.mean(dice), abs=1e-6)
    assert json.loads((tmp_path / "summary.json").read_text())["segmented"] == len(CASES)


def test_a_mask_on_another_grid_is_a_row_error_not_a_crash(adapter, site, cache, tmp_path):
    image = site / "cases" / f"image-{CASES[0]}"
    shifted = nib.load(site / "cases" / f"mask-{CASES[0]}")
    moved = shifted.affine.copy()
    moved[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(shifted.dataobj), moved), tmp_path / "moved.nii.gz")
    huge = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    huge.header.set_data_shape((4000, 4000, 4000))  # 256 GB declared, a few bytes stored
    (tmp_path / "huge.nii").write_bytes(huge.header.binaryblock + b"\0" * 64)
    (tmp_path / "m.csv").write_text(f"image,mask\n{image},moved.nii.gz\nhuge.nii,\n")
    source = manifest_segmentation_studies(tmp_path / "m.csv", (tmp_path, site))
    outcome = segment_studies(load_published(adapter, "cpu"), source, tmp_path / "out",
                              cache_dir=cache)
    errors = [r["error"] for r in _rows(tmp_path / "out")]
    assert errors[0].startswith("bad-values: mask moved.nii.gz: its affine")
    assert errors[1].startswith("too-large: huge.nii: its header declares (4000, 4000, 4000)")
    assert outcome.segmented == 0 and dict(outcome.failed) == {"bad-values": 1, "too-large": 1}


def test_folder_finds_nifti_files_and_series_and_refuses_links_outside(tmp_path):
    small_series(tmp_path / "in" / "ward" / "series-a", 2)
    shutil.copy(DATA / "images" / CASES[0], tmp_path / "in" / "ward" / "case.nii.gz")
    (tmp_path / "in" / ".hidden").mkdir()
    (tmp_path / "in" / ".hidden" / "x.nii.gz").write_bytes(b"x")
    (tmp_path / "secret.nii.gz").write_bytes(b"x")
    (tmp_path / "in" / "link.nii.gz").symlink_to(tmp_path / "secret.nii.gz")
    studies = folder_segmentation_studies(tmp_path / "in").studies
    assert [s.identifier for s in studies] == ["link.nii.gz", "ward/case.nii.gz",
                                               "ward/series-a"]
    assert studies[0].image is None and studies[0].problem.startswith("outside:")
    assert len(studies[2].files) == 2 and studies[2].image.is_dir()


@pytest.mark.slow
def test_loopback_dicom_series_to_dicom_seg(adapter, cache, tmp_path):
    """A hospital's run: the command in its own process on a real DICOM series."""
    series = small_series(tmp_path / "studies" / "series-1", SLICES)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "medfed_cli.main", "predict", str(adapter), "--input",
         str(tmp_path / "studies"), "--out", str(out), "--cache", str(cache), "--device",
         "cpu", "--threads", "1", "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
            str(REPO), os.environ.get("PYTHONPATH")])), COLUMNS="200"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 of 1 studies segmented (3 slices)" in done.stdout
    row = _rows(out)[0]
    source = place_series(series)
    seg = hd.seg.segread(row["dicom_seg"])
    raw = pydicom.dcmread(row["dicom_seg"])
    first = source.datasets[0]
    assert raw.Modality == "SEG" and raw.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert raw.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert raw.StudyInstanceUID == first.StudyInstanceUID
    assert raw.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert int(raw.NumberOfFrames) == SLICES
    assert (raw.Rows, raw.Columns) == (first.Rows, first.Columns)
    # one frame per source slice, each at its slice's position (highdicom orders the frames)
    frames = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID:
              [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
              for f in raw.PerFrameFunctionalGroupsSequence}
    assert frames == {ds.SOPInstanceUID: [float(v) for v in ds.ImagePositionPatient]
                      for ds in source.datasets}
    segment = raw.SegmentSequence[0]
    assert segment.SegmentLabel == "hippocampus"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "5366008"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    card = read_card(adapter)
    assert algorithm.AlgorithmName.startswith("medfed")
    assert card.adapter_files[ADAPTER_FILE] in algorithm.AlgorithmParameters
    # the SEG's frames, the NIfTI mask and the series grid agree
    nifti = nib.load(row["mask_nifti"])
    voxels, affine = read_dicom_series(series)
    assert nifti.shape == voxels.shape and np.allclose(nifti.affine, affine)
    planes = np.asarray(nifti.dataobj).transpose(2, 1, 0) > 0
    per_slice = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in source.datasets],
        segment_numbers=[1])
    assert np.array_equal(per_slice[..., 0].astype(bool), planes)
    assert int(row["voxels"]) == planes.sum() > 0


def _recarded(adapter: Path, folder: Path, **changes) -> Path:
    """A copy whose card is re-published (pins embedded again) with ``changes``."""
    copy = folder / "recarded"
    shutil.copytree(adapter, copy)
    card = read_card(copy)
    for key, value in changes.items():
        setattr(card, key, value)
    (copy / CARD_FILE).unlink()
    write_card(copy, card)
    return copy


def _edited(adapter: Path, folder: Path, edit) -> Path:
    """A copy whose card.json is edited by hand (the adapter file's pins left as published)."""
    copy = folder / "edited"
    shutil.copytree(adapter, copy)
    values = json.loads((copy / CARD_FILE).read_text())
    edit(values)
    (copy / CARD_FILE).write_text(json.dumps(values))
    return copy


def _flip_byte(folder: Path) -> None:
    data = bytearray((folder / ADAPTER_FILE).read_bytes())
    data[-1] ^= 1
    (folder / ADAPTER_FILE).write_bytes(bytes(data))


WRONG_PINS = {
    "task": (lambda v: v.update(task="classification"), "task: the card says 'classification'"),
    "weights": (lambda v: v["model"].update(weights_sha256="0" * 64), "base weights: "),
    "classes": (lambda v: v.update(classes=["background", "amygdala"]), "classes: the card "),
    "rank": (lambda v: v["model"].update(lora_r=8), "model.lora_r: the card says 8"),
    "preprocessing": (lambda v: v["preprocessing"]["pixels"].update(version=2),
                      "preprocessing.pixels.version: the card says 2"),
}


@pytest.mark.parametrize("pin", sorted(WRONG_PINS))
def test_each_wrong_pin_is_refused(adapter, tmp_path, pin):
    edit, reason = WRONG_PINS[pin]
    with pytest.raises(PinError, match=reason):
        load_published(_edited(adapter, tmp_path, edit), "cpu")


def test_changed_adapter_bytes_are_refused(adapter, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(adapter, copy)
    _flip_byte(copy)
    with pytest.raises(PinError, match="adapter: .* was changed after publication"):
        load_published(copy, "cpu")


@pytest.mark.parametrize(("changes", "reason"), [
    ({"classes": ["background", "anterior", "posterior"]}, "one structure"),
    ({"preprocessing": None}, "preprocessing.pixels: the adapter was trained with"),
])
def test_segmentation_adapters_this_code_cannot_run_are_refused(adapter, tmp_path, changes,
                                                                reason):
    from imaging.preprocessing import segmentation_preprocessing

    if "preprocessing" in changes:
        older = segmentation_preprocessing()
        older.pixels = {**older.pixels, "version": 0}  # published by another pipeline version
        changes = {"preprocessing": older}
    with pytest.raises(PinError, match=reason):
        load_published(_recarded(adapter, tmp_path, **changes), "cpu")


def test_the_command_refuses_a_wrong_pin_and_writes_nothing(adapter, site, tmp_path):
    from medfed_cli.main import main

    tampered = _edited(adapter, tmp_path, lambda v: v.update(task="classification"))
    code = main(["predict", str(tampered), "--manifest", str(site / "labelled.csv"),
                 "--out", str(tmp_path / "refused"), "--device", "cpu", "--no-progress"])
    assert code == 1 and not (tmp_path / "refused").exists()


def test_a_series_slice_declaring_a_huge_frame_is_refused_before_decoding(tmp_path):
    from imaging.guard import DicomReadError
    from inference.seg_studies import SegStudy
    from inference.seg_volumes import read_study

    series = small_series(tmp_path / "series", 2)
    hostile = sorted(series.iterdir())[0]
    ds = pydicom.dcmread(hostile)
    ds.Rows, ds.Columns = 65535, 65535  # 8 GiB declared, 3 KiB of pixel data stored
    ds.save_as(hostile)
    study = SegStudy("series", series, tuple(sorted(series.iterdir())))
    with pytest.raises(DicomReadError, match="one frame would decode to") as refused:
        read_study(study)
    assert refused.value.kind == "too-large"
