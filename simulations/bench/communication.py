"""Bytes a hospital uploads per round with LoRA, against sending the full model.

Runs one real training round per simulated hospital through the ClientApp, in-process, and
measures the serialised arrays in each reply (what Flower puts on the wire, before gRPC framing).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from flwr.app import Array, ArrayRecord, RecordDict

from client.app import build_client_app
from models.adapters import adapter_state
from models.config import ModelConfig, TrainConfig, to_config_record
from models.registry import build_base_model, weights_sha256
from server.rounds import initial_model
from simulations.config import DataConfig
from simulations.inprocess import coordinator_message
from simulations.sites import SimulatedSiteLoader
from strategies.replies import arrayrecord_nbytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench communication")
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--backbone", default=ModelConfig.backbone)
    parser.add_argument("--image-size", type=int, default=ModelConfig.image_size)
    parser.add_argument("--lora-r", type=int, default=ModelConfig.lora_r)
    parser.add_argument("--examples", type=int, default=500, help="training examples in all")
    args = parser.parse_args(argv)

    from flwr.app import Context

    model_config = ModelConfig(
        backbone=args.backbone, image_size=args.image_size, lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r, weights_sha256=weights_sha256(args.backbone),
    )
    data = DataConfig(num_hospitals=args.hospitals, partition="iid",
                      max_train_examples=args.examples)
    train = TrainConfig(local_epochs=1)
    app = build_client_app(SimulatedSiteLoader(data, seed=0))
    arrays = ArrayRecord(adapter_state(initial_model(model_config, seed=0)))
    config = to_config_record(model_config, train)
    config["server-round"] = 1

    uploads = []
    for hospital in range(args.hospitals):
        context = Context(run_id=1, node_id=hospital + 1,
                          node_config={"partition-id": hospital}, state=RecordDict(),
                          run_config={})
        reply = app(coordinator_message("train", arrays, config, dst_node_id=hospital + 1),
                    context)
        if reply.has_error():
            raise RuntimeError(f"hospital {hospital} failed: {reply.error.reason}")
        uploads.append(arrayrecord_nbytes(reply.content["arrays"]))
        print(f"hospital {hospital}: uploaded {uploads[-1]:,} bytes in round 1")

    full_state = build_base_model(replace(model_config)).state_dict()
    full = arrayrecord_nbytes(ArrayRecord({k: Array(v.numpy()) for k, v in full_state.items()}))
    adapter_params = sum(t.numel() for t in adapter_state(initial_model(model_config, 0)).values())
    full_params = sum(t.numel() for t in full_state.values() if torch.is_floating_point(t))
    mean_upload = sum(uploads) / len(uploads)
    print(f"backbone: {args.backbone} at {args.image_size} px, LoRA r={args.lora_r}")
    print(f"adapter + head: {adapter_params:,} values; full model: {full_params:,} values")
    print(f"bytes uploaded per hospital per round: {mean_upload:,.0f}")
    print(f"full model bytes: {full:,}")
    print(f"ratio full/adapter: {full / mean_upload:.1f}")
    return 0
