"""Images decoded per second from DICOM (cold) and from the decoded-image cache (round 2).

Writes a synthetic site of CT-sized DICOM files (512 x 512, 12 bits stored, Rescale
Slope/Intercept and a window; a share JPEG 2000 lossless compressed, as PACS exports often are)
with a manifest, then reads it twice through ``client.data.prepare_site``: once with an empty
cache, once with the cache filled. Both passes include the manifest, hashing every file (the
cache key and the fingerprint), the split and the fingerprint.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.uid import JPEG2000Lossless

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench site-data")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--side", type=int, default=512, help="DICOM image side in pixels")
    parser.add_argument("--image-size", type=int, default=64, help="model input side")
    parser.add_argument("--compressed", type=float, default=0.25,
                        help="share of files stored as JPEG 2000 lossless")
    parser.add_argument("--seed", type=int, default=0)
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
    return 0
