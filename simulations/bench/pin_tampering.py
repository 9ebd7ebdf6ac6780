"""Tampering with each pin of a published adapter, and a process's peak memory: shared by the
predict benches (``simulations.bench.predict`` and ``predict_segmentation``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (``VmHWM``: of this process image only, not
    inherited from a parent as ``ru_maxrss`` is)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tamper(adapter: Path, folder: Path, pin: str) -> Path:
    """A copy of ``adapter`` under ``folder`` with one pin changed."""
    from models.adapters import ADAPTER_FILE
    from models.card import CARD_FILE

    copy = folder / pin
    shutil.copytree(adapter, copy)
    if pin == "adapter":
        data = bytearray((copy / ADAPTER_FILE).read_bytes())
        data[-1] ^= 1
        (copy / ADAPTER_FILE).write_bytes(bytes(data))
        return copy
    values = json.loads((copy / CARD_FILE).read_text())
    if pin == "weights":
        values["model"]["weights_sha256"] = "0" * 64
    elif pin == "classes":
        values["classes"] = values["classes"][::-1]
    elif pin == "task":
        values["task"] = "classification" if values["task"] == "segmentation" else "segmentation"
    elif pin == "preprocessing":
        values["preprocessing"]["image_size"] += 16
    (copy / CARD_FILE).write_text(json.dumps(values))
    return copy


def refusals(run_dir: Path, folder: Path) -> tuple[int, int, dict[str, str]]:
    """Each pin tampered in turn: ``(refused, tried, pin -> reason)``."""
    from inference.published import PinError, load_published
    from models.card import CardError

    pins = ("weights", "adapter", "classes", "task", "preprocessing")
    reasons = {}
    for pin in pins:
        try:
            load_published(_tamper(run_dir / "adapter", folder, pin), "cpu")
            reasons[pin] = "ACCEPTED"
        except (PinError, CardError) as err:
            reasons[pin] = str(err).split(";")[0]
    return sum(r != "ACCEPTED" for r in reasons.values()), len(pins), reasons
