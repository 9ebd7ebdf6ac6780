"""Segmentation site data from a manifest: real MSD hippocampus cases load with their geometry,
and each bad row becomes a problem naming its file (never an exception for the whole site)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from imaging.problems import ManifestError
from imaging.segmentation import foreground, foreground_slices, load_cases

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"
REAL = "hippocampus_001.nii.gz"

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is not here")


def _save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return str(path)


def _manifest(folder: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    path = folder / "manifest.csv"
    path.write_text("image,mask,patient_id,split\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


def test_real_case_loads_normalised_with_merged_foreground(tmp_path):
    manifest = _manifest(tmp_path, [(str(DATA / "images" / REAL), str(DATA / "labels" / REAL),
                                     "p001", "train")])
    cases, problems = load_cases(manifest, classes=(0, 1, 2), roots=(DATA,))
    assert problems == [] and len(cases) == 1
    case = cases[0]
    raw = nib.load(DATA / "labels" / REAL)
    assert case.image.shape == case.mask.shape == raw.shape
    assert np.allclose(case.affine, raw.affine)
    assert case.image.dtype == np.float32 and case.image.min() == 0 and case.image.max() == 1
    assert set(np.unique(case.mask)) == {0, 1, 2}
    merged = foreground(case.mask, (1, 2))
    assert merged.sum() == (case.mask > 0).sum() > 0
    slices = foreground_slices(case.mask)
    assert 0 < len(slices) < case.mask.shape[0]
    assert all(case.mask[k].any() for k in slices)


def test_each_bad_row_is_a_problem_naming_its_file(tmp_path):
    image = _save(tmp_path / "img.nii.gz", np.random.default_rng(0).random((8, 9, 7),
                                                                          dtype=np.float32))
    good_mask = np.zeros((8, 9, 7), np.uint8)
    good_mask[3:5, 3:5, 3:5] = 1
    rows = [
        (image, _save(tmp_path / "ok.nii.gz", good_mask), "a", "train"),
        (image, _save(tmp_path / "small.nii.gz", good_mask[:7]), "b", "train"),
        (image, _save(tmp_path / "moved.nii.gz", good_mask, np.diag([2.0, 1, 1, 1])), "c", "val"),
        (image, _save(tmp_path / "label3.nii.gz", good_mask * 3), "d", "val"),
        (image, str(tmp_path / "absent.nii.gz"), "e", "test"),
        (image, str(tmp_path / "ok.nii.gz"), "f", "holdout"),
        (str(DATA / "images" / REAL), str(DATA / "labels" / REAL), "g", "train"),
    ]
    cases, problems = load_cases(_manifest(tmp_path, rows), classes=(0, 1),
                                 roots=(tmp_path,))
    assert [c.patient_id for c in cases] == ["a"]
    by_row = {p.row: p for p in problems}
    assert by_row[3].kind == "bad-values" and "small.nii.gz" in by_row[3].reason
    assert by_row[4].kind == "bad-values" and "affine" in by_row[4].reason
    assert by_row[5].kind == "label" and "mask values 3 are" in by_row[5].reason
    assert by_row[6].kind == "missing" and "absent.nii.gz" in by_row[6].reason
    assert by_row[7].kind == "row" and "holdout" in by_row[7].reason
    assert by_row[8].kind == "outside"  # a real file, but outside the allowed folder


def test_manifest_without_a_column_is_refused(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("image,patient_id,split\nx.nii.gz,p,train\n")
    with pytest.raises(ManifestError, match="mask"):
        load_cases(path, classes=(0, 1))
