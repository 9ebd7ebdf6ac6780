"""CT volumes at the hospital: DICOM series folders and NIfTI files to the encoder's input."""

from __future__ import annotations

import csv

import nibabel
import numpy as np
import pytest

from client.data import SiteDataConfig, prepare_site
from imaging.dicom import DicomReadError
from imaging.volumes import read_dicom_series, read_volume, volume_model_input
from simulations.datasets import find_medmnist
from simulations.volume_export import series_datasets, write_series

SIZE = 16


@pytest.fixture(scope="module")
def volumes() -> tuple[np.ndarray, np.ndarray]:
    """Four real AdrenalMNIST3D volumes in [0, 1], ``(4, 28, 28, 28)``, and their labels."""
    with np.load(find_medmnist("adrenalmnist3d", download=False)) as archive:
        labels = archive["train_labels"].reshape(-1)
        pick = np.r_[np.flatnonzero(labels == 0)[:2], np.flatnonzero(labels == 1)[:2]]
        return archive["train_images"][pick].astype(np.float32) / 255.0, labels[pick]


def test_series_is_ordered_by_position_with_spacing_and_hu_from_headers(tmp_path, volumes):
    volume = volumes[0][0]
    spacing = (0.8, 0.7, 2.5)
    # Instance numbers scrambled and file names in reverse: only positions give the order.
    order = np.random.default_rng(0).permutation(volume.shape[2]) + 1
    folder = tmp_path / "series"
    folder.mkdir()
    for k, ds in enumerate(series_datasets(volume, "P1", spacing, order)):
        ds.save_as(folder / f"{999 - k}.dcm", enforce_file_format=True)
    voxels, affine = read_dicom_series(folder)
    assert voxels.shape == volume.shape
    np.testing.assert_allclose(voxels, -1000 + 2000 * volume, atol=0.5)  # HU, 1 HU steps
    np.testing.assert_allclose(affine, np.diag([*spacing, 1.0]), atol=1e-6)  # RAS
    tensor = volume_model_input(folder, SIZE)
    assert tensor.shape == (1, 1, SIZE, SIZE, SIZE) and tensor.dtype == np.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0


def test_nifti_and_dicom_series_give_the_same_input(tmp_path, volumes):
    volume = volumes[0][1]
    series = write_series(volume, tmp_path / "series", "P2", spacing=(1.0, 1.0, 1.0))
    nifti = tmp_path / "volume.nii.gz"
    nibabel.save(nibabel.Nifti1Image(-1000 + 2000 * volume, np.eye(4)), str(nifti))
    np.testing.assert_allclose(volume_model_input(series, 28), volume_model_input(nifti, 28),
                               atol=1e-3)
    # An LPS-stored NIfTI (axes flipped) is turned back to RAS: same input.
    flipped = tmp_path / "flipped.nii.gz"
    nibabel.save(nibabel.Nifti1Image((-1000 + 2000 * volume)[::-1, ::-1].copy(),
                                     np.diag([-1.0, -1.0, 1.0, 1.0])), str(flipped))
    np.testing.assert_allclose(volume_model_input(flipped, 28), volume_model_input(nifti, 28),
                               atol=1e-5)


def test_missing_slice_mixed_series_and_bad_files_are_named(tmp_path, volumes):
    folder = write_series(volumes[0][2], tmp_path / "gap", "P3")
    (folder / "slice-0010.dcm").unlink()
    with pytest.raises(DicomReadError, match="slices are missing"):
        read_dicom_series(folder)
    mixed = write_series(volumes[0][2][:, :, :4], tmp_path / "mixed", "P3")
    series_datasets(volumes[0][3][:, :, :4], "P3")[0].save_as(mixed / "other.dcm",
                                                              enforce_file_format=True)
    with pytest.raises(DicomReadError, match="series"):
        read_dicom_series(mixed)
    (tmp_path / "x.txt").write_text("not a volume")
    with pytest.raises(DicomReadError, match="series folder or a .nii"):
        read_volume(tmp_path / "x.txt")
    (tmp_path / "broken.nii").write_bytes(b"\0" * 100)
    with pytest.raises(DicomReadError, match="NIfTI"):
        read_volume(tmp_path / "broken.nii")


def test_manifest_of_volumes_gives_a_checked_cached_fingerprinted_site(tmp_path, volumes):
    rows = []
    for n, (volume, label) in enumerate(zip(*volumes, strict=True)):
        if n % 2:
            path = f"v{n}.nii.gz"
            nibabel.save(nibabel.Nifti1Image(-1000 + 2000 * volume, np.eye(4)),
                         str(tmp_path / path))
        else:
            path = f"series-{n}"
            write_series(volume, tmp_path / path, f"P{n}")
        rows.append({"path": path, "label": int(label), "patient_id": f"P{n}",
                     "split": "train" if n < 3 else "val"})
    rows.append({"path": "nowhere", "label": 0, "patient_id": "P9", "split": "train"})
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = SiteDataConfig(frames="volume", cache_dir=str(tmp_path / "cache"))
    sets, report = prepare_site(manifest, config, SIZE)
    assert tuple(sets["train"].images.shape) == (3, 1, SIZE, SIZE, SIZE)
    assert tuple(sets["val"].images.shape) == (1, 1, SIZE, SIZE, SIZE)
    assert sets["train"].labels.tolist() == volumes[1][:3].tolist()
    assert [p.kind for p in report.problems] == ["missing"]
    again, second = prepare_site(manifest, config, SIZE)
    assert second.cache_hits == 4 and second.fingerprint == report.fingerprint
    assert np.array_equal(again["train"].images.numpy(), sets["train"].images.numpy())


def test_simulated_hospitals_read_their_volumes_back_from_ct_series(tmp_path):
    from flwr.app import Context, RecordDict

    from simulations.config import DataConfig
    from simulations.sites import hospital_site, simulated_site_loader

    data = DataConfig(dataset="adrenalmnist3d", num_hospitals=2, partition="iid",
                      max_train_examples=10, as_dicom=True)
    loader = simulated_site_loader(data, SIZE, 0, str(tmp_path))
    assert loader.frames == "volume"
    series = sorted(p for p in (tmp_path / "dicom" / "hospital-1" / "volumes").iterdir())
    assert series and len(list(series[0].glob("*.dcm"))) == SIZE  # one file per slice
    context = Context(run_id=1, node_id=2, node_config={"partition-id": 1}, state=RecordDict(),
                      run_config={})
    site = loader(context, SIZE)
    memory = hospital_site(data, SIZE, 0, 1)
    assert site.train.images.shape == memory.train.images.shape
    np.testing.assert_allclose(site.train.images.numpy(), memory.train.images.numpy(),
                               atol=1e-3)  # 1 HU of 2000
    assert site.train.labels.tolist() == memory.train.labels.tolist()
    assert site.info["fingerprint"]
