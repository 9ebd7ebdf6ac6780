"""Images decoded per second from DICOM (cold) and from the decoded-image cache (round 2).

Writes a synthetic site of CT-sized DICOM files (512 x 512, 12 bits stored, Rescale
Slope/Intercept and a window; a share JPEG 2000 lossless compressed, as PACS exports often are)
with a manifest, then reads it twice through ``client.data.prepare_site``: once with an empty
cache, once with the cache filled. Both passes include the manifest, hashing every file (the
cache key and the fingerprint), the split and the fingerprint.

``--hostile`` also writes a site of hostile files (decompression bombs, a decoder-panic header,
huge labels, paths out of the folder; see :func:`write_hostile_site`) and measures the peak
memory of ``medfed hospital check`` on it.
"""

from __future__ import annotations

import argparse
import csv
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from client.data.config import SiteDataConfig
from client.data.dataset import prepare_site
from simulations.dicom_export import dicom_dataset


def write_site(folder: Path, images: int, side: int, compressed: float, seed: int) -> Path:
    """``images`` DICOM files and ``manifest.csv`` under ``folder``; returns the manifest."""
    rng = np.random.default_rng(seed)
    rows = []
    yy, xx = np.mgrid[:side, :side]
    for n in range(images):
        # A bright disc on a darker, noisy background: CT-like values after rescale.
        disc = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side * rng.uniform(0.2, 0.4)) ** 2
        pixels = (rng.normal(900, 120, (side, side)) + 600 * disc).clip(0, 4095).astype(np.uint16)
        ds = dicom_dataset(pixels, f"P{n // 3:05d}", modality="CT", instance=n + 1)
        ds.BitsStored, ds.HighBit = 12, 11
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.WindowCenter, ds.WindowWidth = 40, 400
        if rng.random() < compressed:
            ds.compress(JPEG2000Lossless)
        name = f"images/{n:05d}.dcm"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / name, enforce_file_format=True)
        rows.append({"path": name, "label": int(disc.mean() > 0.3), "patient_id": f"P{n // 3:05d}"})
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


# --- hostile files (also used by tests/adversarial/test_attack_hostile_files.py) ---------------


def _header(rows: int, columns: int, patient: str, bits: int = 8):
    """A real pydicom dataset whose header declares ``rows`` x ``columns`` pixels."""
    ds = dicom_dataset(np.zeros((2, 2), np.uint8 if bits == 8 else np.uint16), patient)
    ds.Rows, ds.Columns = rows, columns
    del ds.PixelData
    return ds


def rle_bomb(path: Path, rows: int = 60000, columns: int = 60000, fill: bool = False) -> Path:
    """RLE Lossless file declaring ``rows`` x ``columns`` 8-bit pixels. ``fill``: the segment
    really holds that many pixels (replicate runs of 128, about rows*columns/64 bytes);
    otherwise a few runs only (a tiny file)."""
    pairs = (rows * columns + 255) // 256 if fill else 32
    # Replicate runs of 128 pixels, alternating 7 and 200 (an image, not a constant).
    segment = struct.pack("<16L", 1, 64, *([0] * 14)) + bytes([0x81, 7, 0x81, 200]) * pairs
    ds = _header(rows, columns, "P-RLE")
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([segment])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def rle_panic(path: Path) -> Path:
    """RLE file whose frame header declares 3 segments for 16-bit grayscale (2 expected): the
    Rust RLE decoder panics on it (``PanicException``, a ``BaseException``)."""
    segment = struct.pack("<16L", 3, 64, 66, 68, *([0] * 12)) + bytes([0x81, 7]) * 3
    ds = _header(4, 4, "P-PANIC", bits=16)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([segment])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def deflate_bomb(path: Path, side: int = 40000) -> Path:
    """Deflated Explicit VR Little Endian file: a pydicom-written header and a Pixel Data
    element of ``side``**2 zero bytes (1.6 GB for 40000), deflated to a few hundred KB."""
    ds = _header(side, side, "P-DEFLATE")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    element = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, side * side)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = [packer.compress(body.getvalue() + element), packer.flush(zlib.Z_FULL_FLUSH)]
    # After a full flush the compressor starts afresh, so one compressed MiB of zeros repeats.
    block = packer.compress(bytes(2**20)) + packer.flush(zlib.Z_FULL_FLUSH)
    whole, rest = divmod(side * side, 2**20)
    stream += [block] * whole + [packer.compress(bytes(rest)), packer.flush()]
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + b"".join(stream))
    return path


def _good(path: Path, patient: str) -> Path:
    rng = np.random.default_rng(len(patient))
    dicom_dataset(rng.integers(0, 4000, (24, 20)).astype(np.uint16), patient).save_as(
        path, enforce_file_format=True)
    return path


def write_hostile_site(tmp_path: Path) -> Path:
    """A data folder with 4 good rows and every attack, and a FIFO outside it; the manifest."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    secret = outside / "secret.dcm"
    os.mkfifo(secret)  # opening it for reading would block: proves nothing opens it
    (data / "link.dcm").symlink_to(secret)
    (data / "linked-dir").symlink_to(outside, target_is_directory=True)
    rows = [f"good{i}.dcm,{i % 2},G{i}" for i in range(4)]
    for i in range(4):
        _good(data / f"good{i}.dcm", f"G{i}")
    rle_bomb(data / "rle_bomb.dcm")
    rle_bomb(data / "rle_full.dcm", 7800, 7800, fill=True)  # 58 MiB: decodes, under the bound
    rle_panic(data / "rle_panic.dcm")
    deflate_bomb(data / "deflate_bomb.dcm")
    _good(data / "huge_label.dcm", "H1")
    rows += ["rle_bomb.dcm,0,P-RLE", "rle_full.dcm,0,P-RLE", "rle_panic.dcm,1,P-PANIC",
             "deflate_bomb.dcm,1,P-DEFLATE", f"huge_label.dcm,{10**30},H1",
             f"huge_label.dcm,{'9' * 5000},H1",
             "../../etc/passwd,0,X1", f"{secret},0,X2", "link.dcm,0,X3",
             "linked-dir/secret.dcm,0,X4", "linked-dir,0,X5"]
    manifest = data / "manifest.csv"
    manifest.write_text("path,label,patient_id\n" + "\n".join(rows) + "\n")
    return manifest


HOSTILE_ROWS = 15


def hostile_check_peak(folder: Path, image_size: int) -> dict[str, int]:
    """Peak RSS in MiB of ``medfed hospital check`` (its own process) on the hostile site and
    on its good rows only (the imports' share)."""
    manifest = write_hostile_site(folder)
    good = manifest.with_name("good.csv")
    good.write_text("\n".join(manifest.read_text().splitlines()[:5]) + "\n")
    script = ("import resource, sys\nfrom medfed_cli.main import main\ncode = main(sys.argv[1:])\n"
              "sys.stdout.flush()\n"
              "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    peaks = {}
    for name, target in (("hostile", manifest), ("good-only", good)):
        done = subprocess.run(
            [sys.executable, "-c", script, "hospital", "check", "--manifest", str(target),
             "--cache-dir", str(folder / f"cache-{name}"), "--image-size", str(image_size),
             "--max-error-fraction", "1.0"], capture_output=True, text=True, check=False)
        if "MAXRSS_KB" not in done.stdout:
            raise RuntimeError(f"hospital check failed on the {name} site: {done.stderr[-2000:]}")
        peaks[name] = int(done.stdout.rsplit("MAXRSS_KB", 1)[1].split()[0]) // 1024
    return peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench site-data")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--side", type=int, default=512, help="DICOM image side in pixels")
    parser.add_argument("--image-size", type=int, default=64, help="model input side")
    parser.add_argument("--compressed", type=float, default=0.25,
                        help="share of files stored as JPEG 2000 lossless")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hostile", action="store_true",
                        help="also measure hospital check's peak memory on hostile files")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="medfed-site-bench-") as tmp:
        folder = Path(tmp)
        manifest = write_site(folder / "site", args.images, args.side, args.compressed, args.seed)
        config = SiteDataConfig(cache_dir=str(folder / "cache"))
        rates = {}
        for name in ("cold", "cache"):
            started = time.perf_counter()
            sets, report = prepare_site(manifest, config, args.image_size)
            elapsed = time.perf_counter() - started
            images = len(sets["train"]) + len(sets["val"])
            if report.problems:
                raise RuntimeError(f"bench site has problems: {report.problems[:3]}")
            if name == "cache" and report.cache_hits != report.usable_rows:
                raise RuntimeError(f"only {report.cache_hits} cache hits of {report.usable_rows}")
            rates[name] = images / elapsed
            print(f"{name:>5}: {images} images in {elapsed:.2f} s = {rates[name]:.1f} images/s")
    print(f"site: {args.images} DICOM files {args.side}x{args.side}, "
          f"{args.compressed:.0%} JPEG 2000, to {args.image_size} px")
    print(f"cache speedup: {rates['cache'] / rates['cold']:.1f}")
    if args.hostile:
        with tempfile.TemporaryDirectory(prefix="medfed-hostile-") as tmp:
            peaks = hostile_check_peak(Path(tmp), args.image_size)
        print(f"hospital check peak memory: {peaks['hostile']} MiB on {HOSTILE_ROWS} hostile "
              f"rows, {peaks['good-only']} MiB on their 4 good rows alone")
    return 0
