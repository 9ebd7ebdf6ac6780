"""The coordinator's disk fills up while it writes a round's checkpoint: a real, small tmpfs
(mounted for the test; needs root, else skipped). The write fails with a clear reason, the
previous checkpoint stays whole, no partial file is left, and once space is freed the run's next
checkpoint is written and resumes."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from server.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.slow

SIZE_KB = 512


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_KB}k", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _arrays(value: float) -> ArrayRecord:
    # ~160 KB of adapter: two checkpoints do not fit beside the filler below.
    return ArrayRecord({"lora_A": torch.full((200, 200), value),
                        "head": torch.full((2, 16), value)})


def test_disk_full_while_writing_a_checkpoint(small_disk):
    run_dir = small_disk / "run"
    run_dir.mkdir()
    rows = [{"round": 1, "hospital": "0", "train_loss": 0.5}]
    save_checkpoint(run_dir, 1, _arrays(1.0), "fp", rows)
    before = (run_dir / CHECKPOINT_FILE).read_bytes()
    # Fill what is left of the disk.
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass

    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(run_dir, 2, _arrays(2.0), "fp", rows * 2)
    message = str(caught.value)
    assert "No space left on device" in message and "round 2" in message
    assert "previous checkpoint is intact" in message
    assert sorted(p.name for p in run_dir.iterdir()) == [CHECKPOINT_FILE]  # no partial file
    assert (run_dir / CHECKPOINT_FILE).read_bytes() == before
    resumed = load_checkpoint(run_dir, "fp")
    assert resumed is not None and resumed.server_round == 1
    np.testing.assert_array_equal(resumed.arrays["lora_A"].numpy(), np.full((200, 200), 1.0))

    filler.unlink()  # the operator frees space; the next write works
    save_checkpoint(run_dir, 2, _arrays(2.0), "fp", rows * 2)
    assert load_checkpoint(run_dir, "fp").server_round == 2
