"""Attack: a hospital is handed hostile files and runs ``medfed hospital check`` on them.

The attacker controls the manifest and the DICOM files: decompression bombs (RLE and deflate,
written with pydicom, declaring 60000 x 60000 pixels or inflating past a gigabyte), an RLE
header that makes the Rust decoder panic, an RLE frame just under the frame bound that really
decodes, a label of 10**30, and paths that point out of the data folder (``../..``, an absolute
path, a symbolic link). The attack succeeds if the check crashes, reads anything outside the
data folder, or takes more than 1 GB of memory. The targets outside the folder are FIFOs: a
check that opened one would block there, and the test would time out.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from client.data import SiteDataConfig, prepare_site
from imaging.guard import DicomReadError, guarded
from simulations.bench.site_data import deflate_bomb, rle_bomb, write_hostile_site

REPO = Path(__file__).resolve().parents[2]
GIB_KB = 1024 * 1024  # ru_maxrss is in KiB on Linux


@pytest.fixture
def hostile_site(tmp_path):
    return write_hostile_site(tmp_path)


EXPECTED = {
    "rle_bomb.dcm": "too-large", "rle_panic.dcm": "bad-values",
    "deflate_bomb.dcm": "too-large", "../../etc/passwd": "outside", "link.dcm": "outside",
    "linked-dir/secret.dcm": "outside", "linked-dir": "outside",
}


def test_hostile_rows_are_row_problems_and_nothing_outside_is_read(hostile_site, tmp_path):
    config = SiteDataConfig(cache_dir=str(tmp_path / "cache"), max_error_fraction=1.0)
    sets, report = prepare_site(hostile_site, config, 16)
    kinds = {(p.row, p.path): p.kind for p in report.problems}
    by_path = {path: kind for (_, path), kind in kinds.items()}
    for path, kind in EXPECTED.items():
        assert by_path.get(path) == kind, (path, report.problems)
    assert by_path[str(tmp_path / "outside" / "secret.dcm")] == "outside"
    labels = [p for p in report.problems if p.kind == "label"]
    assert len(labels) == 2 and all("not a class index" in p.reason for p in labels)
    assert max(len(p.reason) for p in labels) < 200  # the 5000-digit label is not echoed
    # The four good files and the full-size RLE frame are the only images.
    assert report.usable_rows == 5
    assert len(sets["train"]) + len(sets["val"]) == 5


def test_a_rust_decoder_panic_is_a_row_problem_not_a_crash():
    from rle.rle import decode_frame

    header = struct.pack("<16L", 3, 64, 66, 68, *([0] * 12)) + bytes([0x81, 7]) * 3
    with pytest.raises(BaseException) as raw:  # noqa: B017 - the panic itself, unguarded
        decode_frame(header, 16, 16, "<")
    assert not isinstance(raw.value, Exception)  # escapes 'except Exception'
    with pytest.raises(DicomReadError) as err:
        guarded("unreadable", "pixel data cannot be decoded",
                lambda: decode_frame(header, 16, 16, "<"))
    assert "PanicException" in err.value.reason


def test_hospital_check_on_hostile_input_stays_under_one_gigabyte(hostile_site, tmp_path):
    script = (
        "import resource, sys\n"
        "from medfed_cli.main import main\n"
        "code = main(sys.argv[1:])\n"
        "sys.stdout.flush()\n"
        "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "sys.exit(code)\n")
    # Linux carries a parent's peak RSS into a child's ru_maxrss across fork and exec, and this
    # pytest process may have loaded a large model: a small launcher starts the check, so its
    # figures are the check's own (and its children's, which the launcher reports).
    launcher = (
        "import resource, subprocess, sys\n"
        "code = subprocess.run(sys.argv[1:]).returncode\n"
        "print('CHILDREN_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(code)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), FLWR_HOME=str(tmp_path / ".flwr"))
    done = subprocess.run(
        [sys.executable, "-c", launcher,
         sys.executable, "-c", script, "hospital", "check", "--manifest", str(hostile_site),
         "--cache-dir", str(tmp_path / "cache"), "--image-size", "16",
         "--max-error-fraction", "1.0"],
        capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "panicked" not in done.stderr
    out = done.stdout
    for path in EXPECTED:
        assert path in out
    assert "ready: training would use 5 of 15 rows" in out
    peak_kb = int(out.rsplit("MAXRSS_KB", 1)[1].split()[0])
    children_kb = int(out.rsplit("CHILDREN_KB", 1)[1].split()[0])
    assert peak_kb < GIB_KB and children_kb < GIB_KB, (peak_kb, children_kb)


def test_the_bombs_are_real(tmp_path):
    """Control: the files are what they claim (pydicom parses the headers; the deflate stream
    inflates past 1 GB; the RLE segment holds every pixel of the full-size frame)."""
    ds = pydicom.dcmread(rle_bomb(tmp_path / "a.dcm"))
    assert (ds.Rows, ds.Columns) == (60000, 60000)
    path = deflate_bomb(tmp_path / "b.dcm")
    assert path.stat().st_size < 2 * 2**20
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    raw = path.read_bytes()
    group_length = struct.unpack("<L", raw[140:144])[0]  # (0002,0000) UL after 'DICM'
    chunk = raw[144 + group_length:]
    while chunk:
        total += len(inflater.decompress(chunk, 2**26))
        chunk = inflater.unconsumed_tail
    assert total > 40000 * 40000
    full = pydicom.dcmread(rle_bomb(tmp_path / "c.dcm", 64, 64, fill=True))
    assert full.pixel_array.shape == (64, 64)
    assert set(np.unique(full.pixel_array)) == {7, 200}


def test_jpeg2000_codestream_larger_than_its_header_is_refused_before_decoding(tmp_path):
    """A JPEG 2000 frame whose own SIZ header declares 60000 x 60000 pixels inside a 64 x 64
    DICOM image: the decoder would allocate what the codestream says (gigabytes)."""
    from pydicom.data import get_testdata_file
    from pydicom.encaps import encapsulate, generate_frames

    from imaging.dicom import read_dicom

    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    start = frame.index(b"\xff\x4f\xff\x51")  # SOC, SIZ
    forged = bytearray(frame)
    forged[start + 8:start + 24] = struct.pack(">4L", 60000, 60000, 0, 0)
    ds.PixelData = encapsulate([bytes(forged)])
    path = tmp_path / "forged.dcm"
    ds.save_as(path)
    with pytest.raises(DicomReadError) as err:
        read_dicom(path)
    assert err.value.kind == "bad-values" and "60000 x 60000" in err.value.reason
