"""The CT foundation encoder: pinned pretrained weights, stage presets, the frozen-prefix cache,
what travels, and DP-SGD through its Conv3d LoRA layers. Real weights, real volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import ct_encoder
from models.adapters import adapter_nbytes, adapter_state, load_adapter_state
from models.config import ModelConfig, TrainConfig
from models.feature_centre import centre_on
from models.lora import build_lora_model
from models.registry import (
    CT_BACKBONE,
    CT_RANDOM_BACKBONE,
    WeightsMismatchError,
    backbone_spec,
    verify_weights,
    weights_sha256,
)
from privacy.config import DPConfig
from privacy.dpsgd import train_dpsgd
from privacy.grad_samplers import make_grad_sample_module
from simulations.datasets import find_medmnist

SIZE = 16  # volumes shrink to 1 voxel at layer4: the mechanics, cheaply


def _volumes(split: str, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count // 2`` volumes of each class, ``(N, 1, size, size, size)`` in [0, 1]."""
    with np.load(find_medmnist("adrenalmnist3d", download=False)) as archive:
        labels = archive[f"{split}_labels"].reshape(-1)
        pick = np.sort(np.r_[np.flatnonzero(labels == 0)[: count // 2],
                             np.flatnonzero(labels == 1)[: count - count // 2]])
        images = torch.from_numpy(archive[f"{split}_images"][pick]).float().div(255.0)
    images = images.unsqueeze(1)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size,) * 3, mode="trilinear")
    return images.contiguous(), torch.from_numpy(labels[pick]).long()


@pytest.fixture(scope="module")
def model():
    """LoRA on layer4 of the pretrained encoder, 2 classes."""
    torch.manual_seed(0)
    return build_lora_model(ModelConfig(backbone=CT_BACKBONE, image_size=SIZE,
                                        lora_targets=["layer4"]))


def test_presets_name_each_stage_block_conv():
    names = ct_encoder.preset_targets("layer3-last6+layer4")
    assert len(names) == 6 * 3 + 3 * 3
    assert names[0] == "layer3.30.conv1" and names[-1] == "layer4.2.conv3"
    assert ct_encoder.expand_targets(["layer4", "conv1"])[-1] == "conv1"
    for bad in ("layer5", "layer4-last4", "layer3-last0"):
        with pytest.raises(ValueError, match="layer"):
            ct_encoder.preset_targets(bad)


def test_weights_are_the_published_file_and_a_wrong_pin_is_refused():
    assert weights_sha256(CT_BACKBONE) == ct_encoder.WEIGHTS_SHA256
    assert weights_sha256(CT_RANDOM_BACKBONE) != ct_encoder.WEIGHTS_SHA256
    assert backbone_spec(CT_BACKBONE).spatial_dims == 3
    with pytest.raises(WeightsMismatchError, match="differ"):
        verify_weights(ModelConfig(backbone=CT_BACKBONE, weights_sha256="0" * 64))


def test_only_adapter_and_head_train_and_travel(model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".layer4." in n and "lora_" in n or ".fc." in n for n in trainable)
    state = adapter_state(model)
    assert all(("layer4" in k and "lora_" in k) or "fc" in k for k in state
               if not k.endswith(".centre.mean"))  # the head's fixed centre travels too
    full = adapter_nbytes(model.get_base_model().state_dict())
    assert full / adapter_nbytes(state) >= 200
    base = model.get_base_model()
    assert base.split_index() == sum(ct_encoder.LAYERS[:3])  # layer4's first block
    model.train()
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm3d))
    model.eval()


def test_input_convention_permutes_to_depth_first_and_repeats_channels():
    volume = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 1, 2, 3, 4)
    out = ct_encoder.CTVolumeClassifier.to_encoder_input(volume)
    assert out.shape == (1, 3, 4, 2, 3)
    assert torch.equal(out[0, 2, 1], volume[0, 0, :, :, 1])
    with pytest.raises(ValueError, match="B, 1, H, W, D"):
        ct_encoder.CTVolumeClassifier.to_encoder_input(torch.zeros(1, 3, 4, 4))


def test_prefix_cache_is_exact_and_keyed_by_the_volume(model, tmp_path):
    images, _ = _volumes("test", 6, SIZE)
    base = model.get_base_model()
    base.clear_prefix_cache()
    with torch.no_grad():
        base.cache_bytes = 0
        plain = model(images)
        base.cache_bytes = ct_encoder.DEFAULT_CACHE_BYTES
        first, second = model(images), model(images[[3, 1]])
    assert base.prefix_misses >= 6 and base.prefix_hits >= 2
    assert torch.allclose(first, plain, atol=1e-5) and torch.allclose(second, plain[[3, 1]])
    # On disk: another process (here: the cleared memory) reads the same activations back.
    base.cache_dir = tmp_path
    try:
        with torch.no_grad():
            base.clear_prefix_cache()
            model(images)
            base.clear_prefix_cache()
            misses = base.prefix_misses
            assert torch.allclose(model(images), plain, atol=1e-5)
            assert base.prefix_misses == misses  # every volume came from disk
            changed = images.clone()
            changed[0, 0, 8, 8, 8] = 1.0 - changed[0, 0, 8, 8, 8]
            model(changed[:1])
            assert base.prefix_misses == misses + 1  # another volume, another key
    finally:
        base.cache_dir = None
    assert len(list(tmp_path.rglob("*.npy"))) == 7


def test_conv3d_lora_per_example_gradients_are_exact(model):
    images, labels = _volumes("train", 3, SIZE)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.train()  # opacus records activations in training mode only (BatchNorm stays frozen)
    wrapped = make_grad_sample_module(model)
    try:
        F.cross_entropy(wrapped(images), labels).backward()
        samples = {n: p.grad_sample.clone() for n, p in params.items()}
    finally:
        wrapped._close()
        for p in params.values():
            p.grad, p.grad_sample = None, None
    for i in range(len(labels)):
        grads = torch.autograd.grad(F.cross_entropy(model(images[i : i + 1]), labels[i : i + 1]),
                                    list(params.values()))
        for (name, _), grad in zip(params.items(), grads, strict=True):
            torch.testing.assert_close(samples[name][i], grad, atol=1e-5, rtol=1e-4,
                                       msg=f"per-example gradient of {name}, example {i}")
    model.eval()


def test_one_dpsgd_round_trains_the_conv3d_adapter(model):
    images, labels = _volumes("train", 16, SIZE)
    before = adapter_state(model)
    dp = DPConfig(dpsgd=True, dp_noise_multiplier=1.0, dp_max_grad_norm=1.0)
    try:
        result = train_dpsgd(model, images, labels, TrainConfig(batch_size=8, local_epochs=1,
                                                                lr=1e-3), dp, 1.0, seed=0)
        after = adapter_state(model)
        assert np.isfinite(result.loss)
        moved = [k for k in before if not torch.equal(before[k], after[k])]
        assert any("layer4" in k and "lora_A" in k for k in moved)
        assert not [k for k in moved if "centre" in k]  # fixed: never trained, never noised
        assert all(torch.isfinite(t).all() for t in after.values())
    finally:
        load_adapter_state(model, before)


def test_centring_on_public_volumes_keeps_the_logits_and_shrinks_head_gradients(model):
    """``centre_on`` moves the head's input to the public mean pooled feature and folds the
    shift into the bias: the same logits, smaller per-example head gradients
    ``(p - y) (x - c)``, so DP-SGD's clipping keeps more of what separates the classes."""
    images, _ = _volumes("val", 12, SIZE)  # the public split
    before = adapter_state(model)
    base = model.get_base_model()
    model.eval()
    try:
        with torch.no_grad():
            logits, pooled = model(images), base.pooled(images)
        uncentred = (pooled - before["base_model.model.centre.mean"]).norm(dim=1)
        centre_on(model, images, backbone_spec(CT_BACKBONE).head)
        after = adapter_state(model)
        torch.testing.assert_close(after["base_model.model.centre.mean"], pooled.mean(0),
                                   atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(model(images), logits, atol=1e-4, rtol=1e-4)
        centred = (pooled - after["base_model.model.centre.mean"]).norm(dim=1)
        assert centred.pow(2).sum() < 0.5 * uncentred.pow(2).sum()
    finally:
        load_adapter_state(model, before)


@pytest.mark.parametrize(("shape", "kernel", "stride", "padding"), [
    ((4, 2, 2), 3, 2, 1), ((2, 1, 1), 3, 1, 1), ((5, 3, 1), 3, 1, 1), ((4, 4, 4), 3, 1, 1),
    ((3, 1, 2), (3, 7, 7), (1, 2, 2), (1, 3, 3))])
def test_cropped_conv3d_matches_conv3d(shape, kernel, stride, padding):
    torch.manual_seed(0)
    conv = nn.Conv3d(6, 4, kernel, stride, padding)
    x = torch.randn(2, 6, *shape, requires_grad=True)
    expected = conv(x)
    expected_grad, = torch.autograd.grad(expected.square().sum(), x)
    conv.__class__ = ct_encoder.CroppedConv3d
    out = conv(x)
    grad, = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)


def _probe_auc(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """4-fold cross-validated logistic-regression AUC of pooled layer4 features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = ct_encoder.CTVolumeClassifier(net, cache_bytes=0).eval()
    with torch.no_grad():
        features = torch.cat([classifier.features(images[i : i + 16]).mean((2, 3, 4))
                              for i in range(0, len(images), 16)]).numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=3000))
    scores = cross_val_predict(probe, features, labels.numpy(), method="predict_proba",
                               cv=StratifiedKFold(4, shuffle=True, random_state=0))[:, 1]
    return float(roc_auc_score(labels.numpy(), scores))


def test_pretrained_features_separate_real_volumes_better_than_random_init():
    """The weights are the pretrained ones and do something: on 48 real AdrenalMNIST3D test
    volumes (24 per class, 28^3), a linear probe on the pooled layer4 features of the
    pretrained encoder separates the classes better than on the same network at random init."""
    images, labels = _volumes("test", 48, 28)
    pretrained = _probe_auc(ct_encoder.build_i3resnet152(2, pretrained=True), images, labels)
    random_init = _probe_auc(ct_encoder.build_i3resnet152(2, pretrained=False), images, labels)
    assert pretrained > random_init and pretrained >= 0.6, (pretrained, random_init)


def test_scenario_and_3d_dataset_feed_the_encoder():
    from models.volume_transforms import masks_as_tissue
    from simulations.datasets import load_medmnist
    from simulations.scenarios import load_scenario

    config = load_scenario("ct-foundation")
    assert config.model.backbone == CT_BACKBONE and config.data.dataset == "adrenalmnist3d-tissue"
    assert config.train.optimizer == "sgd" and config.model.image_size == 48
    assert config.model.lora_targets == ["layer4"]
    volumes = load_medmnist("adrenalmnist3d", 20)
    assert tuple(volumes.splits["test"].images.shape) == (298, 1, 20, 20, 20)
    assert volumes.num_classes == 2 and len(volumes.splits["train"]) == 1188
    tissue = load_medmnist("adrenalmnist3d-tissue", 20)
    assert torch.equal(tissue.splits["test"].images, masks_as_tissue(volumes.splits["test"].images))
    assert torch.equal(tissue.splits["train"].labels, volumes.splits["train"].labels)
    flat = load_medmnist("adrenalmnist3d-midslices", 32)
    assert tuple(flat.splits["val"].images.shape) == (98, 3, 32, 32)
    with pytest.raises(ValueError, match="3D dataset"):
        load_medmnist("pneumoniamnist-midslices", 32)


def test_batchnorm_estimate_is_the_population_statistics_of_its_inputs(tmp_path, monkeypatch):
    """After estimation, every BatchNorm's running mean and variance are the mean and variance,
    over all voxels of the calibration volumes, of the inputs it receives in inference mode
    (earlier layers normalised by their own estimated statistics); the statistics survive a
    save/load round trip, a wrong pin is refused, and the cache key changes with them."""
    images, _ = _volumes("val", 6, SIZE)
    net = ct_encoder.build_i3resnet152(2, pretrained=False)
    classifier = ct_encoder.CTVolumeClassifier(net, cache_bytes=0).eval()
    ct_encoder.estimate_batchnorm(classifier, images, batch_size=4)
    checked = {"bn1": net.bn1, "layer3.35.bn2": net.layer3[35].bn2,
               "layer4.0.downsample.1": net.layer4[0].downsample[1],
               "layer4.2.bn3": net.layer4[2].bn3}
    seen: dict[str, torch.Tensor] = {}
    handles = [bn.register_forward_pre_hook(
        lambda _m, inputs, name=name: seen.__setitem__(name, inputs[0].transpose(0, 1).flatten(1)))
        for name, bn in checked.items()]
    with torch.no_grad():
        features = classifier.features(images)
    for handle in handles:
        handle.remove()
    for name, bn in checked.items():
        torch.testing.assert_close(bn.running_mean, seen[name].mean(1), atol=1e-4, rtol=1e-3,
                                   msg=name)
        torch.testing.assert_close(bn.running_var, seen[name].var(1), atol=1e-4, rtol=1e-3,
                                   msg=name)
    assert torch.isfinite(features).all() and features.abs().max() < 1e3  # normalised throughout

    sha = ct_encoder.save_batchnorm_stats(net, tmp_path / "bn.npz")
    fresh = ct_encoder.build_i3resnet152(2, pretrained=False)
    assert not torch.equal(fresh.layer4[2].bn3.running_var, net.layer4[2].bn3.running_var)
    assert ct_encoder.load_batchnorm_stats(fresh, tmp_path / "bn.npz", sha) == sha
    assert torch.equal(fresh.layer4[2].bn3.running_var, net.layer4[2].bn3.running_var)
    with pytest.raises(ValueError, match="pinned"):
        ct_encoder.load_batchnorm_stats(fresh, tmp_path / "bn.npz", "0" * 64)
    assert ct_encoder.calibrated_weights_id("a", sha) != ct_encoder.calibrated_weights_id("a", "b")
    assert ct_encoder.save_batchnorm_stats(net, tmp_path / "again.npz") == sha  # same bytes

    # A backbone named with the statistics' hash loads them from the store, pins both.
    monkeypatch.setenv(ct_encoder.BATCHNORM_DIR_ENV, str(tmp_path / "store"))
    name = f"{CT_RANDOM_BACKBONE}{ct_encoder.BATCHNORM_MARK}{sha}"
    with pytest.raises(FileNotFoundError, match="foundation-probe"):
        build_lora_model(ModelConfig(backbone=name, image_size=SIZE))
    assert ct_encoder.store_batchnorm_file(tmp_path / "bn.npz") == sha
    model = build_lora_model(ModelConfig(backbone=name, image_size=SIZE))
    assert torch.equal(model.get_base_model().net.layer4[2].bn3.running_var,
                       net.layer4[2].bn3.running_var)
    assert weights_sha256(name) == ct_encoder.calibrated_weights_id(
        weights_sha256(CT_RANDOM_BACKBONE), sha) == model.get_base_model().weights_id
    with pytest.raises(ValueError, match="64 hex"):
        backbone_spec(f"{CT_BACKBONE}+bn:abc")


def test_masks_as_tissue_maps_outside_to_fat_and_inside_to_soft_tissue():
    from models.volume_transforms import HU_MAX, HU_MIN, masks_as_tissue

    masks, _ = _volumes("test", 2, 28)
    tissue = masks_as_tissue(masks)
    hu = HU_MIN + tissue * (HU_MAX - HU_MIN)
    assert torch.allclose(hu[masks == 0], torch.tensor(-100.0), atol=1e-3)
    assert torch.allclose(hu[masks == 1], torch.tensor(40.0), atol=1e-3)
    # Linear, so it commutes with the trilinear resize the simulation applies first.
    resized = F.interpolate(masks, size=(20,) * 3, mode="trilinear")
    torch.testing.assert_close(masks_as_tissue(resized),
                               F.interpolate(tissue, size=(20,) * 3, mode="trilinear"))


def test_probe_auc_separates_separable_features_and_not_noise():
    from simulations.bench.foundation_probe import probe_auc

    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(60, int), np.ones(60, int)]
    noise = rng.normal(size=(120, 16))
    signal = noise + labels[:, None] * 1.5
    auc, _ = probe_auc(signal[::2], labels[::2], signal[1::2], labels[1::2])
    chance, _ = probe_auc(noise[::2], labels[::2], noise[1::2], labels[1::2])
    assert auc > 0.95 and abs(chance - 0.5) < 0.2


def test_foundation_bench_options_reach_the_scenario(tmp_path):
    from simulations.bench.foundation import SCENARIO, _overrides, build_parser
    from simulations.scenarios import load_scenario

    args = build_parser().parse_args([
        "--image-size", "48", "--preset", "layer3-last6+layer4", "--lr", "3e-4",
        "--local-steps", "4", "--rounds", "4", "--strategy", "trimmed-mean", "--max-train", "600"])
    config = load_scenario(SCENARIO, _overrides(args, tmp_path))
    assert (config.model.image_size, config.model.lora_targets) == (48, ["layer3-last6+layer4"])
    assert (config.train.lr, config.train.local_steps) == (3e-4, 4)
    assert (config.federation.rounds, config.federation.strategy) == (4, "trimmed-mean")
    assert config.data.max_train_examples == 600
    default = load_scenario(SCENARIO, _overrides(build_parser().parse_args([]), tmp_path))
    assert default.model == load_scenario(SCENARIO).model
