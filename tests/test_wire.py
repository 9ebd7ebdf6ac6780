"""Packed adapters on the deployment wire (core.wire, server.wire_grid, client.wire)."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from client.app import build_client_app
from client.site import SiteData
from core.wire import LAYOUT_KEY, pack_content, unpack_content
from models.adapters import adapter_state
from models.config import TrainConfig, to_config_record
from models.lora import build_lora_model
from server.wire_grid import PackedWireGrid
from simulations.inprocess import InProcessGrid


@pytest.fixture
def adapter(small_model_config) -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(adapter_state(build_lora_model(small_model_config)))


def test_pack_then_unpack_restores_the_adapter_exactly(adapter):
    content = RecordDict({"arrays": ArrayRecord({k: adapter[k] for k in adapter})})
    assert pack_content(content)
    assert list(content["arrays"]) == ["packed"] and LAYOUT_KEY in content.config_records
    assert content["arrays"]["packed"].numpy().nbytes == sum(
        adapter[k].numpy().nbytes for k in adapter)
    assert unpack_content(content)
    assert list(content["arrays"]) == list(adapter)  # same names, same order
    for name in adapter:
        np.testing.assert_array_equal(content["arrays"][name].numpy(), adapter[name].numpy())
    assert LAYOUT_KEY not in content.config_records
    assert not unpack_content(content)  # not packed: left alone


def test_a_layout_that_does_not_add_up_is_refused(adapter):
    content = RecordDict({"arrays": ArrayRecord({k: adapter[k] for k in adapter})})
    pack_content(content)
    layout = content[LAYOUT_KEY]
    content[LAYOUT_KEY] = ConfigRecord(dict(layout) | {"shape": list(layout["shape"])[:-1]})
    with pytest.raises(ValueError, match="arrays-layout"):
        unpack_content(content)


class _WireSpy(InProcessGrid):
    """Records how many arrays each message and reply carries on the wire."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent, self.received = [], []

    def push_messages(self, messages):
        messages = list(messages)
        self.sent += [len(m.content["arrays"]) for m in messages]
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        self.received += [len(r.content["arrays"]) for r in replies if not r.has_error()]
        return replies


def test_a_round_through_the_packed_grid_trains_as_the_plain_one(
        pneumonia_small, small_model_config, adapter):
    train = pneumonia_small.splits["train"]
    rng = np.random.default_rng(0)
    site = SiteData(train=train.subset(rng.choice(len(train), 48, replace=False)),
                    val=train.subset(rng.choice(len(train), 16, replace=False)))
    config = to_config_record(small_model_config,
                              TrainConfig(local_epochs=1, batch_size=16, lr=1e-3))
    config["server-round"] = 1

    def one_round(grid):
        content = RecordDict({"arrays": ArrayRecord({k: adapter[k] for k in adapter}),
                              "config": config})
        [reply] = grid.send_and_receive([grid.create_message(content, "train", 7, "1")])
        assert not reply.has_error(), reply.error
        return reply.content["arrays"]

    app = build_client_app(lambda context, image_size: site)
    plain = one_round(InProcessGrid(app, {7: {"partition-id": 0}}))
    spy = _WireSpy(app, {7: {"partition-id": 0}})
    packed = one_round(PackedWireGrid(spy, poll_interval_s=0.01))
    assert spy.sent == [1] and spy.received == [1]  # one array each way on the wire
    assert list(packed) == list(plain)
    for name in plain:
        np.testing.assert_array_equal(packed[name].numpy(), plain[name].numpy())
