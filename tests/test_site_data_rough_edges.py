"""The reader's rough edges an outside tester found on real DICOM files (issue #34, item 6).

A manifest row with an unquoted comma, a one-line manifest and a field past the CSV reader's
limit, a DICOM file cut inside its header, pydicom's warnings, and 5,000 bad rows. The DICOM
files are real MR slices (``../shared/data/hippocampus/dicom-series``, see its PROVENANCE.md).
"""

from __future__ import annotations

import csv
import shutil
import warnings
from pathlib import Path

import pydicom
import pytest

from client.data import ManifestError, SiteDataConfig, prepare_site
from imaging.dicom import DicomReadError, read_dicom
from simulations.datasets import search_dirs

SIZE = 16
SERIES = next((d / "hippocampus" / "dicom-series" / "study1" for d in search_dirs()
               if (d / "hippocampus" / "dicom-series" / "study1").is_dir()), None)
pytestmark = pytest.mark.skipif(SERIES is None, reason="../shared/data/hippocampus is missing")


def _slices(folder: Path, count: int) -> list[tuple[str, str]]:
    """``count`` real MR slices copied into ``folder``: (name, the file's Patient ID)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for source in sorted(SERIES.glob("*.dcm"))[:count]:
        shutil.copy(source, folder / source.name)
        out.append((source.name, str(pydicom.dcmread(source, stop_before_pixels=True).PatientID)))
    return out


def _config(tmp_path: Path, **changes) -> SiteDataConfig:
    return SiteDataConfig(classes=("normal", "pneumonia"), cache_dir=str(tmp_path / "cache"),
                          **changes)


def _check(tmp_path: Path, manifest: Path, *extra: str) -> list[str]:
    return ["hospital", "check", "--manifest", str(manifest), "--classes", "normal",
            "pneumonia", "--cache-dir", str(tmp_path / "cache"), "--image-size", str(SIZE),
            *extra]


# --- the manifest -------------------------------------------------------------------------


def test_unquoted_comma_is_refused_naming_the_field_count_never_shifted(tmp_path):
    """A comma inside an unquoted path, with the split left empty, made five fields of which
    the last is empty: the row used to be read shifted (path 'scans/Smith', label ' J/...')."""
    (name, patient), = _slices(tmp_path / "scans" / "Smith, J", 1)
    shutil.copy(tmp_path / "scans" / "Smith, J" / name, tmp_path / "ok.dcm")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,patient_id,split\n"
                        f"ok.dcm,normal,{patient},\n"
                        f"scans/Smith, J/{name},pneumonia,{patient},\n"
                        f"ok.dcm,normal,Doe, John,\n")
    _, report = prepare_site(manifest, _config(tmp_path, max_error_fraction=1.0), SIZE)
    assert [(p.row, p.kind) for p in report.problems] == [(3, "row"), (4, "row")]
    for problem in report.problems:
        assert "5 fields but the header has 4" in problem.reason, problem
        assert "double quotes" in problem.reason and "no column is shifted" in problem.reason
    assert report.usable_rows == 1
    # Quoted, the same path is read (the comma is part of the folder's name).
    manifest.write_text("path,label,patient_id,split\n"
                        f'"scans/Smith, J/{name}",pneumonia,{patient},\n')
    _, report = prepare_site(manifest, _config(tmp_path), SIZE)
    assert report.usable_rows == 1 and not report.problems


ONE_LINE = {
    # a giant field after the header's names (no separator for MBs): a _csv.Error traceback
    "one giant field": lambda: "path,label,patient_id," + "x" * 3 * 2**20,
    # rows whose line breaks were lost: 450,000 header columns (the duplicate-name check took
    # quadratic time over them)
    "lost line breaks": lambda: "path,label,patient_id," + ",".join(
        f"img/{i}.dcm,normal,P{i}" for i in range(150_000)),
}


@pytest.mark.parametrize("kind", list(ONE_LINE))
def test_one_line_manifest_exits_naming_the_file_and_the_limit(tmp_path, capsys, kind):
    """A manifest of a few MB on one line ends with exit code 2 naming the file, the line and
    the limit, never a traceback."""
    from medfed_cli.main import main

    manifest = tmp_path / "manifest.csv"
    manifest.write_text(ONE_LINE[kind]())
    assert manifest.stat().st_size > 2 * 2**20 and csv.field_size_limit() == 131_072
    assert main(_check(tmp_path, manifest)) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert str(manifest) in out and "line 1" in out and "131,072" in out, out
    assert "Traceback" not in out
    # Old Mac line endings (CR only) are line breaks, not one line.
    (name, patient), = _slices(tmp_path, 1)
    manifest.write_text(f"path,label,patient_id\r{name},normal,{patient}\r")
    _, report = prepare_site(manifest, _config(tmp_path), SIZE)
    assert report.usable_rows == 1


def test_a_field_past_the_limit_names_the_line_where_it_starts(tmp_path):
    """An opening quote never closed makes the rest of the file one field: the error names the
    row where it opened (line 3), not where the reader gave up, and the limit."""
    rows = [f"img/{i}.dcm,normal,P{i}" for i in range(20_000)]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,patient_id\na.dcm,normal,P1\n\"b.dcm,normal,P2\n"
                        + "\n".join(rows) + "\n")
    with pytest.raises(ManifestError) as caught:
        prepare_site(manifest, _config(tmp_path), SIZE)
    message = str(caught.value)
    assert f"manifest {manifest}, line 3:" in message and "131,072 characters" in message
    assert "never closed" in message


# --- DICOM files --------------------------------------------------------------------------


def _cuts(raw: bytes) -> dict[str, int]:
    """Offsets cutting a real explicit VR little endian file inside its header."""
    patient_name = raw.index(b"\x10\x00\x10\x00PN")
    rows = raw.index(b"\x28\x00\x10\x00US")
    dataset = raw.index(b"\x08\x00", 132 + 12 + int.from_bytes(raw[140:144], "little"))
    return {"empty file": 0, "after the file meta header": dataset,
            "between two elements": patient_name, "inside an element's value": patient_name + 9,
            "before Rows": rows, "after Rows, before Columns": rows + 10}


@pytest.mark.parametrize("where", ["empty file", "after the file meta header",
                                   "between two elements", "inside an element's value",
                                   "before Rows", "after Rows, before Columns"])
def test_dicom_cut_in_its_header_is_truncated(tmp_path, where):
    """Cut before its pixel data, a real file used to be 'no pixel data: this is not an image;
    remove the row' (or 'Columns is missing')."""
    (name, patient), = _slices(tmp_path / "src", 1)
    raw = (tmp_path / "src" / name).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(raw[:_cuts(raw)[where]])
    with pytest.raises(DicomReadError) as caught:
        read_dicom(cut)
    assert caught.value.kind == "truncated", caught.value.reason
    assert "export it again" in caught.value.reason
    if where != "empty file":
        assert "ends inside its header, before its pixel data" in caught.value.reason
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"path,label,patient_id\ncut.dcm,normal,{patient}\n"
                        f"src/{name},normal,{patient}\n")
    _, report = prepare_site(manifest, _config(tmp_path, max_error_fraction=1.0), SIZE)
    (problem,) = report.problems
    assert (problem.row, problem.kind) == (2, "truncated") and "not an image" not in str(problem)


def test_pydicom_warnings_go_into_the_report_not_the_terminal(tmp_path, capfd):
    """A malformed SOP Instance UID makes pydicom warn when the reader looks at it; the warning
    is the row's, in the report (from the cache too), and never reaches the terminal."""
    from medfed_cli.main import main

    files = _slices(tmp_path, 2)
    ds = pydicom.dcmread(tmp_path / files[1][0])
    with warnings.catch_warnings():  # writing it warns too: not the reader's warning
        warnings.simplefilter("ignore")
        ds["SOPInstanceUID"].value = "1.2.abc"  # pydicom warns whenever it reads this value
        ds.save_as(tmp_path / files[1][0])
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,patient_id\n" + "".join(
        f"{name},{label},{patient}\n" for (name, patient), label in
        zip(files, ["normal", "pneumonia"], strict=True)))
    capfd.readouterr()
    for _ in range(2):  # the second run is served by the cache
        with warnings.catch_warnings(record=True) as escaped:  # pytest would hide them
            warnings.simplefilter("always")
            assert main(_check(tmp_path, manifest)) == 0
        assert not [str(w.message) for w in escaped if "VR UI" in str(w.message)]
        captured = capfd.readouterr()
        assert "Invalid value for VR UI" not in captured.err, captured.err
        out = captured.out
        assert "warnings (1 rows, used all the same):" in out
        assert f"row 3 ({files[1][0]}): used, but reading it warned: Invalid value for VR UI" in out
        assert "ready: all 2 rows usable" in out


def test_5000_bad_rows_are_summarised_and_the_full_list_written(tmp_path, capsys):
    """5,000 missing files printed 5,000 lines; now the first 20 per kind and a count, and the
    full list in the report file."""
    from medfed_cli.main import main

    files = _slices(tmp_path, 3)
    rows = [f"{name},normal,{patient}" for name, patient in files]
    rows += [f"gone/{i}.dcm,normal,P{i}" for i in range(4_990)]
    rows += [f"{files[0][0]},pnuemonia,P{i}" for i in range(7)]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,patient_id\n" + "\n".join(rows) + "\n")
    report = tmp_path / "check-report.txt"
    assert main(_check(tmp_path, manifest, "--report", str(report))) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) < 80, len(out)
    assert "  missing (4990):" in out and "  label (7):" in out
    assert "    ... and 4,970 more rows with 'missing' problems (rows 25 to 4994)" in out
    assert sum("file not found" in line for line in out) == 20
    assert f"(4,970 lines left out above: the full list is in {report})" in out
    full = report.read_text().splitlines()
    assert sum("file not found" in line for line in full) == 4_990
    assert sum("did you mean 'pneumonia'" in line for line in full) == 7
    assert report.stat().st_mode & 0o077 == 0  # it names patients: the owner's only
    # Without --report the terminal says how to get the full list.
    assert main(_check(tmp_path, manifest)) == 1
    assert "with --report FILE for the full list" in capsys.readouterr().out
    # A report file that cannot be written is said before the check runs.
    assert main(_check(tmp_path, manifest, "--report", str(tmp_path / "no" / "r.txt"))) == 2
    assert "cannot write the check report" in capsys.readouterr().out


def test_captured_warnings_nest_and_leave_library_deprecations_alone():
    """What an inner block (one file) captures is its row's too; a library's deprecation
    warning is about the code, not the file: not a row warning, warned as usual."""
    from imaging.guard import Notes, captured

    row, file = Notes(), Notes()
    with warnings.catch_warnings(record=True) as outside:
        warnings.simplefilter("always")
        with captured(row):
            with captured(file):
                warnings.warn("Invalid value for VR UI: '1.2.abc'", UserWarning, stacklevel=1)
            warnings.warn("x is deprecated", DeprecationWarning, stacklevel=1)
    assert file.lines == row.lines == ["Invalid value for VR UI: '1.2.abc'"]
    assert [str(w.message) for w in outside] == ["x is deprecated"]
