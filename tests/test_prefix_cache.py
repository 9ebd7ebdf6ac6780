"""The frozen-prefix cache of the 2D backbone: exact, bounded, used only where it is exact."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from client.training import train_local
from models.adapters import adapter_state
from models.config import TrainConfig
from models.lora import build_lora_model, freeze_batchnorm
from models.prefix_cache import PrefixCache, input_digest


def _classifier(model):
    return model.base_model.model  # the ImageClassifier inside peft's wrapper


def test_default_adapter_leaves_a_frozen_prefix_in_inference_mode(small_model_config):
    model = build_lora_model(small_model_config)
    classifier = _classifier(model)
    blocks = classifier._blocks()
    split = classifier.split_index()
    # The default adapts stages 2-6: the three blocks of stages 0-1 hold nothing trainable.
    assert split == 3
    assert not any(p.requires_grad for b in blocks[:split] for p in b.parameters())
    assert any(p.requires_grad for p in blocks[split].parameters())
    model.train()
    freeze_batchnorm(model)
    # No stochastic depth or batch statistics in the prefix: its output is a function of the image.
    assert not any(m.training for b in blocks[:split] for m in b.modules())
    assert all(b.training for b in blocks[split:])


def test_cached_prefix_gives_the_networks_logits_and_gradients(small_model_config, site):
    model = build_lora_model(small_model_config)
    classifier = _classifier(model)
    batch = site.train.images[:16]
    model.eval()
    with torch.no_grad():  # MONAI's own forward, through every block
        direct = classifier.net(classifier._normalised(batch))
        assert torch.equal(model(batch), direct)  # computed and stored
    model.train()
    freeze_batchnorm(model)
    grads = []
    for _ in range(2):  # the second pass reads the stored prefix
        torch.manual_seed(0)  # the same stochastic depth in the trained blocks
        model.zero_grad()
        model(batch).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert classifier.prefix_cache.hits == 2 * len(batch)
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_training_from_cached_prefix_is_exact(small_model_config, site):
    """Two epochs from cached activations give the adapter that recomputing them gives, bit for
    bit (the cached activations of an image come from another batch than the one reusing them)."""
    train = TrainConfig(local_epochs=2, batch_size=16, lr=2e-3)
    adapters, caches = [], []
    for cache_bytes in (1 << 30, 0):
        torch.manual_seed(0)
        model = build_lora_model(small_model_config)
        _classifier(model).prefix_cache = PrefixCache(cache_bytes)
        start = adapter_state(model)
        train_local(model, site.train.images, site.train.labels, train, seed=3)
        adapters.append(adapter_state(model))
        caches.append(_classifier(model).prefix_cache)
    cached, recomputed = adapters
    assert cached.keys() == recomputed.keys()
    assert all(torch.equal(cached[k], recomputed[k]) for k in cached)
    assert any(not torch.equal(cached[k], start[k]) for k in cached)  # training moved it
    # The cached run computed each image's prefix once and reused it in the second epoch.
    assert caches[0].misses == len(site.train) and caches[0].hits >= len(site.train)
    assert caches[1].hits == 0


def test_all_pointwise_preset_trains_the_whole_network_without_cache(small_model_config, site):
    config = dataclasses.replace(small_model_config, lora_targets=["all-pointwise"])
    model = build_lora_model(config)
    classifier = _classifier(model)
    assert classifier.split_index() == 0  # block 0's project conv trains: nothing is frozen
    model.eval()
    with torch.no_grad():
        model(site.val.images)
    assert classifier.prefix_cache.hits == classifier.prefix_cache.misses == 0


def test_cache_stays_within_its_budget_and_recomputes_what_it_dropped():
    calls = []

    def prefix(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return x * 2.0

    images = torch.rand(10, 1, 4, 4)
    one = images[0].numel() * images.element_size()
    cache = PrefixCache(max_bytes=3 * one)
    first = cache.activations(images, 1, prefix)  # more than fits: all computed, 3 kept
    assert torch.equal(first, images * 2.0)
    assert cache._bytes <= 3 * one and len(cache._entries) == 3
    again = cache.activations(images[-3:], 1, prefix)  # the most recent three: hits
    assert torch.equal(again, images[-3:] * 2.0) and calls == [10]
    cache.activations(images[:2], 1, prefix)  # dropped earlier: computed again
    assert calls == [10, 2]
    cache.activations(images[:2], 2, prefix)  # another split is another key
    assert calls == [10, 2, 2]


def test_prefix_on_disk_is_read_back_scoped_and_a_torn_file_is_computed_again(tmp_path):
    calls = []

    def square(inputs):
        calls.append(len(inputs))
        return inputs**2

    inputs = torch.arange(12.0).view(3, 4)
    PrefixCache(1 << 20, tmp_path, "net-a").activations(inputs, 1, square)
    assert len(list(tmp_path.rglob("*.npy"))) == 3
    calls.clear()
    # Another process (an empty memory) reads the files; another network or split does not.
    again = PrefixCache(0, tmp_path, "net-a")
    assert torch.equal(again.activations(inputs, 1, square), inputs**2) and calls == []
    PrefixCache(0, tmp_path, "net-b").activations(inputs, 1, square)
    PrefixCache(0, tmp_path, "net-a").activations(inputs, 2, square)
    assert calls == [3, 3]
    calls.clear()
    torn = again.path((1, input_digest(inputs[0])))
    torn.write_bytes(torn.read_bytes()[:20])
    assert torch.equal(PrefixCache(0, tmp_path, "net-a").activations(inputs, 1, square), inputs**2)
    assert calls == [2]  # the torn one, computed as a pair
    assert torch.equal(torch.from_numpy(np.load(torn)), inputs[0] ** 2)  # and written whole again
    with pytest.raises(ValueError, match="scope"):
        PrefixCache(0, tmp_path)
