"""``medfed hospital check`` on a segmentation site: real MSD hippocampus cases, a mask on
another grid and a mask with an undeclared value, reported as a round would read them."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfed_cli.main import main as medfed

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"
CASES = ("hippocampus_001.nii.gz", "hippocampus_003.nii.gz", "hippocampus_004.nii.gz")
CLASSES = ["background", "hippocampus-anterior", "hippocampus-posterior"]

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is not here")


def _site(folder: Path, splits: tuple[str, ...]) -> Path:
    """Real cases copied into ``folder`` with a manifest giving them ``splits``."""
    rows = []
    for k, (name, split) in enumerate(zip(CASES, splits, strict=False)):
        for kind in ("images", "labels"):
            (folder / kind).mkdir(parents=True, exist_ok=True)
            shutil.copy(DATA / kind / name, folder / kind / name)
        rows.append({"image": f"images/{name}", "mask": f"labels/{name}",
                     "patient_id": f"P{k}", "split": split})
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "mask", "patient_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _check(manifest: Path, capsys, *extra: str) -> tuple[int, str]:
    status = medfed(["hospital", "check", "--manifest", str(manifest), "--classes", *CLASSES,
                     *extra])
    return status, capsys.readouterr().out


def test_a_segmentation_site_is_checked_as_a_round_reads_it(tmp_path, capsys):
    manifest = _site(tmp_path, ("train", "train", "val"))
    status, out = _check(manifest, capsys)
    assert status == 0, out
    assert "rows: 3, usable: 3, left out: 0" in out
    assert "train  cases     2  patients     2" in out and "val    cases     1" in out
    shape = nib.load(DATA / "images" / CASES[0]).shape
    assert "volume shape (voxels): min" in out and "ready: 3 of 3 rows usable" in out
    assert min(shape) > 0


def test_bad_rows_are_named_and_a_site_without_validation_is_not_ready(tmp_path, capsys):
    manifest = _site(tmp_path, ("train", "train", "val"))
    # The validation case's mask moved to another grid; a training mask gains value 7.
    val_mask = tmp_path / "labels" / CASES[2]
    img = nib.load(val_mask)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine @ np.diag([2, 1, 1, 1])),
             val_mask)
    train_mask = tmp_path / "labels" / CASES[1]
    img = nib.load(train_mask)
    values = np.asarray(img.dataobj).copy()
    values[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(values, img.affine), train_mask)
    report = tmp_path / "check-report.txt"
    status, out = _check(manifest, capsys, "--max-error-fraction", "1", "--report", str(report))
    assert status == 1
    assert f"row 4 (images/{CASES[2]})" in out and "not the same grid" in out
    assert "mask values 7 are not among the declared classes [0, 1, 2]" in out
    assert "NOT READY: no usable val case holds the structure" in out
    assert "NOT READY" in report.read_text()
    # Within the default error share: refused for the share first.
    status, out = _check(manifest, capsys)
    assert status == 1 and "2 of 3 rows (66.7%) are unusable" in out
