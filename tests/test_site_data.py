"""Hospital data: manifest + DICOM -> checked, split, cached, fingerprinted images.

Real DICOM files shipped with pydicom (CT, MR, JPEG 2000, RLE, JPEG colour, a truncated file,
an RT plan) and small generated files for each bad-input case.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom import examples
from pydicom.data import get_testdata_file

from client.data import ManifestError, SiteDataConfig, SiteDataError, prepare_site
from client.data.cache import DecodedCache
from client.data.dataset import load_manifest_site
from client.data.split import assign_splits
from imaging.dicom import DicomReadError, read_dicom, supported_transfer_syntaxes
from imaging.transforms import to_model_input
from simulations.dicom_export import dicom_dataset

SIZE = 16


def _write(path: Path, pixels: np.ndarray, patient: str = "P1", **attrs) -> Path:
    ds = dicom_dataset(pixels, patient)
    for key, value in attrs.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _gradient(h: int = 24, w: int = 20, dtype=np.uint16, top: int = 4000) -> np.ndarray:
    return np.linspace(0, top, h * w).reshape(h, w).astype(dtype)


def _manifest(folder: Path, rows: list[dict], name: str = "manifest.csv") -> Path:
    path = folder / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _config(tmp_path: Path, **changes) -> SiteDataConfig:
    return SiteDataConfig(classes=("normal", "pneumonia"), cache_dir=str(tmp_path / "cache"),
                          **changes)


def _site(tmp_path: Path, patients: int = 6, per_patient: int = 2) -> Path:
    """A clean site: ``patients`` patients with ``per_patient`` images each, labels alternate."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(patients):
        for i in range(per_patient):
            name = f"img/p{p}_{i}.dcm"
            _write(tmp_path / name, rng.integers(0, 4000, (24, 20)).astype(np.uint16), f"P{p}")
            rows.append({"path": name, "label": ["normal", "pneumonia"][p % 2],
                         "patient_id": f"P{p}"})
    return _manifest(tmp_path, rows)


# --- real files pydicom ships -------------------------------------------------------------


def test_modality_lut_on_pydicom_ct_matches_rescale(tmp_path):
    ds = examples.ct
    decoded = read_dicom(get_testdata_file("CT_small.dcm"))
    stored = ds.pixel_array.astype(np.float64)
    expected = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(decoded.frames[0, 0], expected, rtol=1e-6)
    image = to_model_input(decoded, SIZE)
    assert image.shape == (1, 1, SIZE, SIZE) and 0.0 <= image.min() and image.max() <= 1.0


@pytest.mark.parametrize("compressed", ["MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"])
def test_lossless_compressed_files_decode_like_the_uncompressed_original(compressed):
    reference = to_model_input(read_dicom(get_testdata_file("MR_small.dcm")), SIZE)
    image = to_model_input(read_dicom(get_testdata_file(compressed)), SIZE)
    np.testing.assert_allclose(image, reference, atol=1e-6)


def test_jpeg2000_and_colour_jpeg_decode():
    j2k = to_model_input(read_dicom(get_testdata_file("JPEG2000.dcm")), SIZE)
    rgb = to_model_input(read_dicom(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")), SIZE)
    assert j2k.shape == (1, 1, SIZE, SIZE) and j2k.std() > 0.01
    assert rgb.shape == (1, 3, SIZE, SIZE)
    # The test image has coloured bands: channels differ.
    assert np.abs(rgb[0, 0] - rgb[0, 1]).max() > 0.2
    names = supported_transfer_syntaxes()
    assert "JPEG 2000 Image Compression" in names and "RLE Lossless" in names
    assert "JPEG-LS Lossless Image Compression" in names


@pytest.mark.parametrize("name,kind", [("MR_truncated.dcm", "truncated"),
                                       ("rtplan.dcm", "not-image"),
                                       ("rtdose.dcm", "not-image"),
                                       ("test-SR.dcm", "not-image")])
def test_damaged_and_non_image_pydicom_files_are_named(name, kind):
    with pytest.raises(DicomReadError) as err:
        read_dicom(get_testdata_file(name))
    assert err.value.kind == kind


# --- generated files: pixel pipeline ---------------------------------------------------------


def test_window_maps_to_unit_range_and_monochrome1_inverts(tmp_path):
    pixels = _gradient()
    plain = _write(tmp_path / "a.dcm", pixels, WindowCenter=2000, WindowWidth=1000)
    mono1 = _write(tmp_path / "b.dcm", pixels, WindowCenter=2000, WindowWidth=1000,
                   PhotometricInterpretation="MONOCHROME1")
    image = read_dicom(plain)
    frame = to_model_input(image, 24)[0, 0]
    # Values below the window are black, above it white.
    assert frame[:4].max() == 0.0 and frame[-4:].min() == 1.0
    inverted = to_model_input(read_dicom(mono1), 24)[0, 0]
    np.testing.assert_allclose(inverted, 1.0 - frame, atol=1e-6)


def test_multiframe_middle_or_all_and_series_folder(tmp_path):
    stack = np.stack([np.full((8, 8), v, np.uint16) for v in (0, 1, 2)])
    stack[:, 0, 0] = 100  # not constant
    path = _write(tmp_path / "mf.dcm", stack)
    middle = read_dicom(path, "middle")
    assert middle.frames.shape == (1, 1, 8, 8) and middle.frames[0, 0, 1, 1] == 1
    assert read_dicom(path, "all").frames.shape == (3, 1, 8, 8)
    series = tmp_path / "series"
    for n, value in enumerate((5, 7, 9), 1):
        slice_ = np.full((8, 8), value, np.uint16)
        slice_[0, 0] = 100
        _write(series / f"s{4 - n}.dcm", slice_, InstanceNumber=n)  # names in reverse order
    assert read_dicom(series, "middle").frames[0, 0, 1, 1] == 7
    assert read_dicom(series, "all").frames[:, 0, 1, 1].tolist() == [5, 7, 9]


# --- bad input ----------------------------------------------------------------------------


def test_every_bad_row_is_reported_with_its_reason(tmp_path):
    good = _site(tmp_path, patients=4, per_patient=1)
    rows = pd.read_csv(good).to_dict("records")
    (tmp_path / "fake.dcm").write_text("patient list, not an image")
    whole = (tmp_path / "img" / "p0_0.dcm").read_bytes()
    (tmp_path / "trunc.dcm").write_bytes(whole[: len(whole) // 2])
    flat = _write(tmp_path / "flat.dcm", _gradient(), RescaleSlope=0, RescaleIntercept=7)
    ds = dicom_dataset(_gradient(), "P9")
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm", enforce_file_format=True)
    shutil.copy(tmp_path / "img" / "p1_0.dcm", tmp_path / "copy.dcm")
    bad = [("missing.dcm", "normal", "missing"), ("fake.dcm", "normal", "not-dicom"),
           ("trunc.dcm", "normal", "truncated"), (flat.name, "normal", "bad-values"),
           ("nopix.dcm", "normal", "no-pixels"), ("copy.dcm", "normal", "duplicate"),
           ("img/p2_0.dcm", "pnuemonia", "label")]
    rows += [{"path": p, "label": label, "patient_id": f"X{i}"} for i, (p, label, _) in
             enumerate(bad)]
    manifest = _manifest(tmp_path, rows)
    sets, report = prepare_site(manifest, _config(tmp_path, max_error_fraction=0.5), SIZE)
    found = {p.path: p for p in report.problems}
    for path, _, kind in bad:
        assert found[path].kind == kind, found[path]
    assert "did you mean 'pneumonia'" in found["img/p2_0.dcm"].reason
    assert found["copy.dcm"].reason.startswith("same SOP Instance UID as row 3")
    assert report.usable_rows == 4 and len(sets["train"]) + len(sets["val"]) == 4
    # Above the error fraction training refuses, naming the problems.
    with pytest.raises(SiteDataError, match="unusable"):
        load_manifest_site(manifest, _config(tmp_path, max_error_fraction=0.1), SIZE)


@pytest.mark.parametrize("content,match", [
    ("", "is empty"),
    ("path,label,patient_id\n", "no rows"),
    ("file,label,patient_id\na.dcm,normal,P1\n", r"lacks the column\(s\) \['path'\]"),
])
def test_bad_manifests_raise_clear_errors(tmp_path, content, match):
    path = tmp_path / "manifest.csv"
    path.write_text(content)
    with pytest.raises(ManifestError, match=match):
        prepare_site(path, _config(tmp_path), SIZE)


def test_configurable_columns_and_label_indices(tmp_path):
    _write(tmp_path / "a.dcm", _gradient(), "A")
    _write(tmp_path / "b.dcm", _gradient(top=100), "B")
    manifest = _manifest(tmp_path, [{"file": "a.dcm", "finding": "1", "mrn": "A"},
                                    {"file": "b.dcm", "finding": "Normal", "mrn": "B"}])
    config = _config(tmp_path, path_column="file", label_column="finding",
                     patient_column="mrn", val_fraction=0.5)
    sets, report = prepare_site(manifest, config, SIZE)
    assert report.usable_rows == 2 and not report.problems
    labels = sorted(sets["train"].labels.tolist() + sets["val"].labels.tolist())
    assert labels == [0, 1]


# --- split, cache, fingerprint ----------------------------------------------------------------


def test_split_never_puts_a_patient_on_both_sides():
    rng = np.random.default_rng(3)
    patients = [f"P{rng.integers(0, 40)}" for _ in range(300)]
    given = [["", "", "train", "val"][rng.integers(0, 4)] if i % 7 == 0 else ""
             for i in range(300)]
    splits, across = assign_splits(patients, given, 0.25, seed=1)
    sides: dict[str, set[str]] = {}
    for patient, split in zip(patients, splits, strict=True):
        sides.setdefault(patient, set()).add(split)
    assert all(len(s) == 1 for s in sides.values())
    assert {"train", "val"} <= set(splits)
    for patient in across:  # given on both sides: moved to train
        assert sides[patient] == {"train"}


def test_cache_serves_round_two_and_survives_a_corrupt_entry(tmp_path):
    manifest = _site(tmp_path)
    config = _config(tmp_path)
    first, report = prepare_site(manifest, config, SIZE)
    assert report.cache_hits == 0
    second, report = prepare_site(manifest, config, SIZE)
    assert report.cache_hits == report.usable_rows == 12
    assert np.array_equal(first["train"].images, second["train"].images)
    entries = sorted((tmp_path / "cache").rglob("*.npz"))
    entries[0].write_bytes(b"not a zip")
    entries[1].write_bytes(entries[1].read_bytes()[:100])
    third, report = prepare_site(manifest, config, SIZE)
    assert report.cache_hits == 10 and not report.problems
    assert np.array_equal(first["train"].images, third["train"].images)
    # A different image size is a miss, not a stale hit.
    _, report = prepare_site(manifest, config, SIZE * 2)
    assert report.cache_hits == 0
    assert DecodedCache(tmp_path / "cache").get("0" * 64) is None


def test_fingerprint_follows_data_not_row_order_and_shares_no_ids(tmp_path):
    manifest = _site(tmp_path)
    config = _config(tmp_path, use_cache=False)
    _, report = prepare_site(manifest, config, SIZE)
    table = pd.read_csv(manifest)
    table.iloc[::-1].to_csv(manifest, index=False)
    assert prepare_site(manifest, config, SIZE)[1].fingerprint == report.fingerprint
    shared = report.shareable()
    text = repr(shared)
    assert "P1" not in text and ".dcm" not in text and shared["usable-rows"] == 12
    ds = pydicom.dcmread(tmp_path / "img" / "p3_1.dcm")
    ds.PixelData = bytes([ds.PixelData[0] ^ 1]) + ds.PixelData[1:]
    ds.save_as(tmp_path / "img" / "p3_1.dcm")
    assert prepare_site(manifest, config, SIZE)[1].fingerprint != report.fingerprint


def test_hospital_check_command_exit_codes(tmp_path, capsys):
    from medfed_cli.main import main

    manifest = _site(tmp_path, patients=4, per_patient=1)
    args = ["hospital", "check", "--manifest", str(manifest), "--classes", "normal", "pneumonia",
            "--cache-dir", str(tmp_path / "cache"), "--image-size", str(SIZE)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ready: all 4 rows usable" in out and "fingerprint: sha256:" in out
    rows = pd.read_csv(manifest).to_dict("records")
    rows.append({"path": "gone.dcm", "label": "normal", "patient_id": "Z"})
    _manifest(tmp_path, rows)
    assert main(args) == 1  # 1 of 5 rows bad > 10 %
    out = capsys.readouterr().out
    assert "gone.dcm" in out and "NOT READY" in out
    assert main(args + ["--max-error-fraction", "0.3"]) == 0
    assert "1 left out" in capsys.readouterr().out


@pytest.mark.parametrize("slope,intercept,ok", [(0, 7, False), (1e38, 0, False),
                                                (-1.5, 32768.5, True)])
def test_odd_16_bit_rescale_values(tmp_path, slope, intercept, ok):
    path = _write(tmp_path / "r.dcm", _gradient(), RescaleSlope=slope, RescaleIntercept=intercept)
    if not ok:
        with pytest.raises(DicomReadError) as err:
            to_model_input(read_dicom(path), SIZE)
        assert err.value.kind == "bad-values" and "Rescale" in err.value.reason
        return
    # A negative slope is odd but valid: the image comes out reversed against slope 1.
    plain = to_model_input(read_dicom(_write(tmp_path / "p.dcm", _gradient())), SIZE)
    np.testing.assert_allclose(to_model_input(read_dicom(path), SIZE), 1.0 - plain, atol=1e-5)


def test_site_data_config_from_toml_and_node_config(tmp_path):
    from client.data.config import SiteDataConfigError, from_node_config

    toml = tmp_path / "site.toml"
    toml.write_text('[site_data]\nclasses = ["a", "b"]\nlabel_column = "finding"\n'
                    'frames = "all"\n')
    config = from_node_config({"site-config": str(toml), "site-val-fraction": "0.3",
                               "manifest": "/x.csv", "partition-id": 1})
    assert config.classes == ("a", "b") and config.label_column == "finding"
    assert config.frames == "all" and config.val_fraction == 0.3
    assert from_node_config({"classes": "x, y"}).classes == ("x", "y")
    with pytest.raises(SiteDataConfigError, match="node config: colour: unknown setting"):
        from_node_config({"site-colour": "red"})
    with pytest.raises(SiteDataConfigError, match="frames = 'first': must be one of 'middle'"):
        from_node_config({"site-frames": "first"})


@pytest.mark.parametrize(("line", "words"), [
    ("val_fractoin = 0.3", "val_fractoin: unknown setting (did you mean 'val_fraction'?)"),
    ('val_fraction = "0.3"', "val_fraction = '0.3': expected a number"),
    ("val_fraction = 1.5", "val_fraction = 1.5: must be >= 0, < 1"),
    ("max_error_fraction = -0.1", "max_error_fraction = -0.1: must be >= 0, <= 1"),
    ('frames = "midle"', "frames = 'midle': must be one of 'middle', 'all', 'volume' "
                         "(did you mean 'middle'?)"),
    ("max_frame_bytes = 0", "max_frame_bytes = 0: must be >= 1"),
    ('use_cache = "no"', "use_cache = 'no': expected true or false"),
    ("classes = [1, 2]", "classes[0] = 1: expected a string"),
    ('classes = ["a", "A"]', "repeat a name"),
    ('manifest_encoding = "klingon"', "not a known encoding"),
])
def test_site_data_file_refuses_what_the_reader_refuses(tmp_path, line, words):
    """A site data file is read by the one typed reader: the refusal names the file, the key,
    the value and what is allowed, when the file is read."""
    from client.data.config import SiteDataConfigError, load_site_data_config

    toml = tmp_path / "hospital.toml"
    toml.write_text(f"[site_data]\n{line}\n")
    with pytest.raises(SiteDataConfigError) as err:
        load_site_data_config(toml)
    assert str(toml) in str(err.value) and "[site_data]" in str(err.value)
    assert words in str(err.value)


def test_unsupported_transfer_syntax_and_bom_manifest(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    ds = dicom_dataset(_gradient(), "P1")
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "video.dcm", enforce_file_format=True)
    _write(tmp_path / "ok.dcm", _gradient(), "P2")
    manifest = tmp_path / "manifest.csv"
    # As a spreadsheet saves it: byte-order mark, CRLF line ends.
    manifest.write_bytes("\ufeffpath,label,patient_id\r\nvideo.dcm,normal,P1\r\n"
                         "ok.dcm,normal,P2\r\n".encode())
    _, report = prepare_site(manifest, _config(tmp_path, max_error_fraction=0.5), SIZE)
    assert report.usable_rows == 1
    (problem,) = report.problems
    assert problem.kind == "unsupported" and "MPEG2" in problem.reason


def test_patient_given_both_splits_is_reported_and_kept_in_train(tmp_path):
    manifest = _site(tmp_path, patients=4, per_patient=2)
    table = pd.read_csv(manifest)
    table["split"] = ["train", "val", "val", "val", "train", "train", "train", "train"]
    table.to_csv(manifest, index=False)
    sets, report = prepare_site(manifest, _config(tmp_path), SIZE)
    assert report.patients_across_splits == ["P0"]
    assert report.patients == {"train": 3, "val": 1}
    assert len(sets["val"]) == 2 and len(sets["train"]) == 6
    from client.data.check import format_report

    text = format_report(report, _config(tmp_path))
    assert "patients in both train and val" in text and "  P0" in text


def test_unwritable_cache_only_costs_a_warning(tmp_path, caplog):
    manifest = _site(tmp_path, patients=2, per_patient=1)
    (tmp_path / "blocked").write_text("a file where the cache folder should be")
    config = SiteDataConfig(classes=("normal", "pneumonia"), cache_dir=str(tmp_path / "blocked"))
    sets, report = prepare_site(manifest, config, SIZE)
    assert report.usable_rows == 2 and not report.problems
    assert "cannot write cache entry" in caplog.text


# --- real exports: odd values, odd manifests, odd objects ----------------------------------------


def _bad_ds_value(path: Path, keyword: str, value: str) -> Path:
    """A file whose ``keyword`` (a DS) holds ``value`` as written by a broken export: pydicom
    writes a valid placeholder, whose bytes are then replaced."""
    ds = dicom_dataset(_gradient(), "P1")
    setattr(ds, keyword, "7.25")
    ds.RescaleIntercept = "0"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    old = b"DS\x04\x007.25"
    assert raw.count(old) == 1
    padded = value.encode() + b" " * (len(value) % 2)
    path.write_bytes(raw.replace(old, b"DS" + len(padded).to_bytes(2, "little") + padded))
    return path


@pytest.mark.parametrize("value", ["1,5", "abc"])
def test_one_bad_rescale_slope_is_a_row_problem_not_an_abort(tmp_path, value):
    good = _site(tmp_path, patients=4, per_patient=1)
    _bad_ds_value(tmp_path / "bad.dcm", "RescaleSlope", value)
    rows = pd.read_csv(good).to_dict("records")
    rows.append({"path": "bad.dcm", "label": "normal", "patient_id": "P1"})
    manifest = _manifest(tmp_path, rows)
    _, report = prepare_site(manifest, _config(tmp_path, max_error_fraction=0.5), SIZE)
    (problem,) = report.problems
    assert problem.kind == "bad-values" and "RescaleSlope" in problem.reason
    assert report.usable_rows == 4


def test_empty_rescale_slope_means_no_rescale(tmp_path):
    path = _bad_ds_value(tmp_path / "empty.dcm", "RescaleSlope", "")
    plain = read_dicom(_write(tmp_path / "p.dcm", _gradient()))
    np.testing.assert_allclose(read_dicom(path).frames, plain.frames)


def test_extra_field_is_reported_and_no_column_shifts(tmp_path):
    _write(tmp_path / "a.dcm", _gradient(), "A")
    _write(tmp_path / "b.dcm", _gradient(top=100), "B")
    manifest = tmp_path / "manifest.csv"
    # The first data row has one field too many: pandas would take the first column as an
    # index and shift every column of every row.
    manifest.write_text("path,label,patient_id\nb.dcm,normal,B,oops\na.dcm,pneumonia,A\n"
                        ",,\n,,,\n")
    _, report = prepare_site(manifest, _config(tmp_path, max_error_fraction=0.5), SIZE)
    (problem,) = report.problems
    assert problem.row == 2 and problem.kind == "row" and "4 fields" in problem.reason
    assert report.rows == 2 and report.usable_rows == 1  # the empty ",," rows are skipped
    assert report.images["train"]["pneumonia"] + report.images["val"]["pneumonia"] == 1
    assert report.manifest_info.skipped_empty == 2


def test_semicolon_tab_and_latin1_manifests(tmp_path):
    from client.data.check import format_report

    _write(tmp_path / "é.dcm", _gradient(), "José")
    _write(tmp_path / "b.dcm", _gradient(top=100), "B")
    text = "path;label;patient_id\né.dcm;normal;José\nb.dcm;pneumonia;B\n"
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(text, encoding="utf-8")
    config = _config(tmp_path, val_fraction=0.5)
    _, report = prepare_site(manifest, config, SIZE)
    assert report.usable_rows == 2
    assert "semicolon-separated" in format_report(report, config)
    manifest.write_text(text.replace(";", "\t"), encoding="utf-8")
    assert prepare_site(manifest, config, SIZE)[1].usable_rows == 2
    manifest.write_text(text, encoding="cp1252")
    with pytest.raises(ManifestError, match=r"line 2.*Latin-1 / Windows-1252.*cp1252"):
        prepare_site(manifest, config, SIZE)
    assert prepare_site(manifest, _config(tmp_path, val_fraction=0.5,
                                          manifest_encoding="cp1252"), SIZE)[1].usable_rows == 2
    manifest.write_text("path;diagnosis;mrn\na.dcm;normal;A\n")
    with pytest.raises(ManifestError, match="split at semicolons"):
        prepare_site(manifest, config, SIZE)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_truncated_compressed_image_is_reported_as_truncated(tmp_path, name, capfd):
    data = Path(get_testdata_file(name)).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - len(data) // 4])
    _write(tmp_path / "ok.dcm", _gradient(), "P2")
    manifest = _manifest(tmp_path, [{"path": "cut.dcm", "label": "normal", "patient_id": "P1"},
                                    {"path": "ok.dcm", "label": "normal", "patient_id": "P2"}])
    config = _config(tmp_path, max_error_fraction=0.5, match_patient_id=False)
    _, report = prepare_site(manifest, config, SIZE)
    (problem,) = report.problems
    assert problem.kind == "truncated" and "truncated" in problem.reason, problem
    # pydicom's warning is in the row problem, not printed.
    captured = capfd.readouterr()
    assert "End of file" not in captured.err + captured.out


def _multiframe_rle(path: Path, frames: int, broken: set[int]) -> Path:
    from pydicom.uid import RLELossless

    stack = np.stack([np.full((8, 8), 10 * f, np.uint8) for f in range(frames)])
    stack[:, 0, 0] = 255
    ds = dicom_dataset(stack, "P1")
    ds.compress(RLELossless)
    if broken:
        from pydicom.encaps import encapsulate, generate_frames

        parts = list(generate_frames(ds.PixelData, number_of_frames=frames))
        parts = [b"\x07" * 70 if i in broken else p for i, p in enumerate(parts)]
        ds.PixelData = encapsulate(parts)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_multiframe_decodes_only_the_frames_it_keeps(tmp_path):
    # Every frame but the middle one is garbage: the middle mode never decodes them.
    path = _multiframe_rle(tmp_path / "mf.dcm", 5, broken={0, 1, 3, 4})
    middle = read_dicom(path, "middle")
    assert middle.frames.shape == (1, 1, 8, 8) and middle.frames[0, 0, 1, 1] == 20
    with pytest.raises(DicomReadError):
        read_dicom(path, "all")
    whole = read_dicom(_multiframe_rle(tmp_path / "ok.dcm", 5, set()), "all")
    assert whole.frames[:, 0, 1, 1].tolist() == [0, 10, 20, 30, 40]
    assert whole.frames.dtype == np.float32


def test_palette_colour_goes_through_its_palette():
    from pydicom.pixels import apply_color_lut

    path = get_testdata_file("examples_palette.dcm")
    decoded = read_dicom(path)
    ds = pydicom.dcmread(path)
    expected = apply_color_lut(ds.pixel_array, ds)
    assert decoded.frames.shape == (1, 3, ds.Rows, ds.Columns)
    assert decoded.rgb_max == (255 if expected.dtype == np.uint8 else 65535)
    np.testing.assert_array_equal(decoded.frames[0], np.moveaxis(expected, -1, 0))
    image = to_model_input(decoded, SIZE)
    assert image.shape == (1, 3, SIZE, SIZE) and np.abs(image[0, 0] - image[0, 2]).max() > 0.1


def test_segmentation_object_is_refused(tmp_path):
    from pydicom.uid import SegmentationStorage

    ds = dicom_dataset(np.zeros((8, 8), np.uint8), "P1", modality="SEG")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    ds.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    with pytest.raises(DicomReadError) as err:
        read_dicom(tmp_path / "seg.dcm")
    assert err.value.kind == "not-image" and "Segmentation Storage" in err.value.reason


def test_patient_id_differing_from_the_file_is_reported_or_linked(tmp_path):
    manifest = _site(tmp_path, patients=4, per_patient=2)
    table = pd.read_csv(manifest)
    table.loc[1, "patient_id"] = "P0-alias"  # the file still says P0
    table.to_csv(manifest, index=False)
    _, report = prepare_site(manifest, _config(tmp_path), SIZE)
    (problem,) = report.problems
    assert problem.kind == "patient" and "'P0'" in problem.reason and problem.row == 3
    # Pseudonymous manifests: not a problem, but both rows still land in one split.
    config = _config(tmp_path, match_patient_id=False, val_fraction=0.5)
    for seed in range(6):
        sets, report = prepare_site(manifest, replace(config, seed=seed), SIZE)
        assert not report.problems
        splits = {split: {tuple(x) for x in sets[split].images[:, 0, 0, :2].tolist()}
                  for split in ("train", "val")}
        first, second = (to_model_input(read_dicom(tmp_path / f"img/p0_{i}.dcm"), SIZE)
                         for i in range(2))
        sides = [s for s in ("train", "val") for img in (first, second)
                 if tuple(img[0, 0, 0, :2].tolist()) in splits[s]]
        assert len(set(sides)) == 1, (seed, sides)


def test_fingerprint_includes_the_frames_setting(tmp_path):
    manifest = _site(tmp_path, patients=2, per_patient=1)
    middle = prepare_site(manifest, _config(tmp_path), SIZE)[1].fingerprint
    every = prepare_site(manifest, _config(tmp_path, frames="all"), SIZE)[1].fingerprint
    assert middle != every


def test_paths_confined_to_allowed_roots(tmp_path):
    data, other = tmp_path / "data", tmp_path / "other"
    _write(other / "x.dcm", _gradient(), "X")
    _write(data / "a.dcm", _gradient(top=100), "A")
    (data / "inside-link.dcm").symlink_to(data / "a.dcm")
    rows = [{"path": str(other / "x.dcm"), "label": "normal", "patient_id": "X"},
            {"path": "inside-link.dcm", "label": "normal", "patient_id": "A"}]
    manifest = _manifest(data, rows)
    config = _config(tmp_path, max_error_fraction=1.0, val_fraction=0.0)
    _, report = prepare_site(manifest, config, SIZE)
    assert [p.kind for p in report.problems] == ["outside"] and report.usable_rows == 1
    allowed = replace(config, allowed_roots=(".", "../other"))
    _, report = prepare_site(manifest, allowed, SIZE)
    assert not report.problems and report.usable_rows == 2


def test_frame_bound_is_configurable_and_checked_before_decoding(tmp_path):
    path = _write(tmp_path / "a.dcm", _gradient(240, 200))  # 96000 bytes
    from imaging.guard import ReadLimits

    with pytest.raises(DicomReadError) as err:
        read_dicom(path, limits=ReadLimits(max_frame_bytes=90000))
    assert err.value.kind == "too-large" and "max_frame_bytes" in err.value.reason
    assert read_dicom(path, limits=ReadLimits(max_frame_bytes=96000)).frames.shape[-2:] == \
        (240, 200)
    stack = _write(tmp_path / "mf.dcm", np.stack([_gradient()] * 4))
    with pytest.raises(DicomReadError, match="max_pixel_bytes"):
        read_dicom(stack, limits=ReadLimits(max_pixel_bytes=3 * 24 * 20 * 2))


def test_labels_are_bounded_without_conversion():
    from imaging.manifest import parse_label

    assert parse_label("0001", ("a", "b")) == (1, "")
    for text in ("2", str(10**30), "9" * 100000, "-1", "²"):
        label, why = parse_label(text, ("a", "b"))
        assert label is None and len(why) < 300
    assert parse_label("999", ())[0] == 999 and parse_label("1000", ())[0] is None


def test_every_pydicom_test_file_is_an_image_or_a_named_problem():
    """No file pydicom ships (damaged, odd syntaxes, non-images, DICOMDIRs) escapes as anything
    but a DicomReadError with a known kind."""
    from client.data.problems import KINDS

    names = sorted({Path(p).name: p for p in pydicom.data.get_testdata_files("*.dcm")}.items())
    outcomes = {}
    for name, path in names:
        try:
            decoded = read_dicom(path)
            assert decoded.frames.dtype == np.float32 and decoded.frames.ndim == 4
            outcomes[name] = "ok"
        except DicomReadError as err:
            assert err.kind in KINDS, (name, err.kind)
            outcomes[name] = err.kind
    assert outcomes["image_dfl.dcm"] == "ok"  # deflated, inflated within the bound
    assert outcomes["rtdose.dcm"] == outcomes["rtdose_rle.dcm"] == "not-image"
    assert outcomes["examples_palette.dcm"] == outcomes["SC_rgb_rle_2frame.dcm"] == "ok"
    assert sum(v == "ok" for v in outcomes.values()) > 40
