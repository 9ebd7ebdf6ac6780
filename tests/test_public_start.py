"""A run that starts from an adapter trained on public data (``[federation] initial_adapter``)."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from loopback import LoopbackGrid, server_identity

from client.app import build_client_app
from client.site import SiteData
from core.hashing import file_sha256
from models.adapters import AdapterMismatchError, adapter_file, adapter_state
from models.config import TrainConfig
from models.metrics import evaluate
from server.config import FederationConfig
from server.records import RunRecords
from server.rounds import initial_model, run_federation
from simulations.config import load_config
from simulations.public_start import PublicStartConfig, public_split, train_public_start
from simulations.runner import resolve


def _rows(images: torch.Tensor) -> list[bytes]:
    return sorted(row.numpy().tobytes() for row in images)


def test_public_split_is_a_seeded_disjoint_cut_of_val(pneumonia_small):
    val = pneumonia_small.splits["val"]
    public, rest = public_split("pneumoniamnist", 32, 0.25, seed=0)
    assert len(public) == round(0.25 * len(val)) and len(public) + len(rest) == len(val)
    # Together they are the val split, each image once: nothing public is among the rest.
    assert _rows(torch.cat([public.images, rest.images])) == _rows(val.images)
    again, _ = public_split("pneumoniamnist", 32, 0.25, seed=0)
    other, _ = public_split("pneumoniamnist", 32, 0.25, seed=1)
    assert torch.equal(again.images, public.images)
    assert not torch.equal(other.images, public.images)


@pytest.fixture(scope="module")
def public_start(tmp_path_factory, pneumonia_small):
    from models.config import ModelConfig
    from models.registry import weights_sha256

    model_config = ModelConfig(image_size=32, num_classes=2, lora_r=4, lora_alpha=8,
                               weights_sha256=weights_sha256("efficientnet-lite0-imagenet"))
    out = tmp_path_factory.mktemp("public-start")
    record = train_public_start(PublicStartConfig(fraction=0.5, epochs=3, seed=0),
                                model_config, out)
    return model_config, out, record


def test_public_start_records_what_it_wrote(public_start, pneumonia_small):
    model_config, out, record = public_start
    written = json.loads((out / "public_start.json").read_text())
    assert written["adapter_sha256"] == file_sha256(adapter_file(out / "adapter"))
    assert written["public_images"] == round(0.5 * len(pneumonia_small.splits["val"]))
    # Trained on real X-rays, the start already separates the classes on the test split.
    assert written["test"]["auc"] > 0.75


def test_run_starts_from_the_initial_adapter(tmp_path, public_start, pneumonia_small):
    model_config, out, record = public_start
    train = pneumonia_small.splits["train"]
    sites = [SiteData(train=train.subset(np.arange(i * 48, i * 48 + 32)),
                      val=train.subset(np.arange(i * 48 + 32, i * 48 + 48))) for i in range(2)]
    test = pneumonia_small.splits["test"].subset(np.arange(0, 600, 5))
    app = build_client_app(lambda context, size: sites[int(context.node_config["partition-id"])])
    seen: dict[int, dict[str, float]] = {}
    federation = FederationConfig(rounds=1, min_hospitals=2, round_timeout_s=60,
                                  initial_adapter=str(out / "adapter"),
                                  initial_adapter_sha256=record["adapter_sha256"])
    with server_identity():
        run_federation(LoopbackGrid(app, [{"partition-id": 0}, {"partition-id": 1}]),
                       federation, model_config,
                       TrainConfig(batch_size=16, local_steps=2, lr=1e-3, seed=3),
                       test, RunRecords(tmp_path), on_round=lambda r, m: seen.setdefault(r, m))
    # Round 0 is the public start itself, not freshly initialised factors and head.
    start = initial_model(model_config, 3, str(out / "adapter"))
    fresh = initial_model(model_config, 3)
    assert seen[0]["test-auc"] == pytest.approx(evaluate(start, test.images, test.labels)["auc"])
    assert seen[0]["test-auc"] != pytest.approx(evaluate(fresh, test.images, test.labels)["auc"])
    assert set(seen) == {0, 1}


def test_initial_adapter_is_pinned_and_checked(tmp_path, public_start):
    model_config, out, record = public_start
    with pytest.raises(ValueError, match="not the pinned"):
        initial_model(model_config, 0, str(out / "adapter"), "0" * 64)
    with pytest.raises(AdapterMismatchError, match="rank"):
        initial_model(replace(model_config, lora_r=8, lora_alpha=16), 0, str(out / "adapter"))
    with pytest.raises(FileNotFoundError, match="no adapter file"):
        initial_model(model_config, 0, str(tmp_path / "missing"))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        initial_model(model_config, 0, str(corrupt))
    # A study pins the file it starts from when it is resolved, and refuses a missing one.
    study = resolve(load_config(None, {"run_dir": str(tmp_path / "run"), "federation": {
        "initial_adapter": str(out / "adapter")}}))
    assert study.federation.initial_adapter_sha256 == record["adapter_sha256"]
    with pytest.raises(FileNotFoundError, match="federation.initial_adapter"):
        resolve(load_config(None, {"federation": {"initial_adapter": str(tmp_path / "none")}}))
    assert adapter_state(initial_model(model_config, 0, str(out / "adapter")))
