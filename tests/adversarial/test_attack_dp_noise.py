"""Attack: the coordinator removes the hospital's DP noise because it can predict it.

The attacker holds everything the coordinator holds: the run's seed, the round, the hospital's
node and partition id, the global adapter it sent and the adapter the hospital released. Its
best guess of the noise is what a generator seeded from those would draw (how medfed drew it
before, and what ``insecure_replayable_noise`` still draws in simulations). Each test first
shows the attack recovering the clipped update exactly when the noise IS replayable (so the
test can fail), then asserts it recovers nothing from a hospital's real noise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from client.app import build_client_app
from client.privacy_round import SitePrivacy
from client.site import SiteData
from models.adapters import adapter_state
from models.config import TrainConfig, to_config_record
from models.lora import build_lora_model
from privacy.config import DPConfig
from privacy.dpsgd import plan_round, train_dpsgd
from privacy.noise import ReplayableNoise, SecureNoise
from simulations.inprocess import coordinator_message

HOSPITAL = 2
SEED, ROUND = 11, 3


@pytest.fixture(scope="module")
def site(pneumonia_small):
    train = pneumonia_small.splits["train"]
    rng = np.random.default_rng(5)
    return SiteData(train=train.subset(rng.choice(len(train), 48, replace=False)),
                    val=train.subset(rng.choice(len(train), 16, replace=False)))


def _released(site, model_config, insecure: bool, clip: float, z: float):
    """One update-DP round through the real ClientApp; returns (global, released) adapters."""
    app = build_client_app(lambda context, image_size: site,
                           lambda context: SitePrivacy(insecure_replayable_noise=insecure))
    context = Context(run_id=1, node_id=99, node_config={"partition-id": HOSPITAL},
                      state=RecordDict(), run_config={})
    torch.manual_seed(0)
    start = adapter_state(build_lora_model(model_config))
    train = TrainConfig(local_steps=2, batch_size=16, lr=1e-2, seed=SEED)
    dp = DPConfig(update_clip_norm=clip, update_noise_multiplier=z, update_hospitals=1)
    config = to_config_record(model_config, train, dp)
    config["server-round"] = ROUND
    reply = app(coordinator_message("train", ArrayRecord(start), config), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return start, reply.content["arrays"].to_torch_state_dict()


def _attacker_residual(start, released, clip: float, z: float) -> float:
    """The coordinator's best guess: the noise a generator seeded from what it knows draws.
    Returns the norm of ``released - global - guess`` (the clipped update, if the guess is
    right: at most ``clip``)."""
    seed = SEED * 1_000_003 + ROUND * 1_009 + HOSPITAL  # all public to the coordinator
    guess = ReplayableNoise(seed)
    squares = 0.0
    for name, tensor in released.items():  # the reply's order is the adapter's order
        noise = guess.gaussian(tuple(tensor.shape), z * clip, torch.float64)
        residual = tensor.double() - start[name].double() - noise
        squares += float(residual.pow(2).sum())
    return math.sqrt(squares)


def test_coordinator_cannot_subtract_the_update_noise(site, small_model_config):
    clip, z = 0.05, 1.0
    start, replayable = _released(site, small_model_config, True, clip, z)
    dims = sum(t.numel() for t in replayable.values())
    noise_norm = z * clip * math.sqrt(dims)
    # Control: replayable noise is removed exactly; what is left is the clipped update.
    assert _attacker_residual(start, replayable, clip, z) <= clip * 1.001
    # The hospital's real noise: the residual keeps the noise's full norm (sqrt(2) of it:
    # the attacker's wrong guess adds its own), hundreds of times the clipped update.
    start, secure = _released(site, small_model_config, False, clip, z)
    residual = _attacker_residual(start, secure, clip, z)
    assert residual > 0.9 * noise_norm and residual > 50 * clip


def test_same_round_replayed_draws_different_noise(site, small_model_config):
    """Everything the coordinator controls held fixed (seed, round, node, global adapter):
    two releases differ by two independent noise draws, so neither predicts the other."""
    clip, z = 0.05, 1.0
    start, first = _released(site, small_model_config, False, clip, z)
    _, second = _released(site, small_model_config, False, clip, z)
    gap = math.sqrt(sum(float((first[k].double() - second[k].double()).pow(2).sum())
                        for k in first))
    dims = sum(t.numel() for t in first.values())
    assert gap == pytest.approx(math.sqrt(2) * z * clip * math.sqrt(dims), rel=0.1)
    # The control: replayable noise gives the same release twice.
    _, again_a = _released(site, small_model_config, True, clip, z)
    _, again_b = _released(site, small_model_config, True, clip, z)
    assert all(torch.equal(again_a[k], again_b[k]) for k in again_a)


def _one_sgd_step(site, model_config, noise, z: float, lr: float):
    torch.manual_seed(0)
    model = build_lora_model(model_config)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    before = [p.detach().clone() for _, p in params]
    config = TrainConfig(local_steps=1, batch_size=16, lr=lr, weight_decay=0.0)
    dp = DPConfig(dpsgd=True, dp_noise_multiplier=z, dp_optimizer="sgd", dp_momentum=0.0)
    train_dpsgd(model, site.train.images, site.train.labels, config, dp, z, seed=SEED,
                noise=noise)
    after = [p.detach().clone() for _, p in params]
    return before, after, config


def _dpsgd_residual(site, before, after, config, z: float) -> float:
    """After one SGD step ``p' = p - lr (S + noise) / E``; the attacker replays the draws
    (Poisson mask first, then one Gaussian per trainable tensor) from the seed and returns
    ``|| -(E / lr) (p' - p) - guess ||``: the clipped gradient sum ``S`` if the guess is right
    (at most ``N * C``)."""
    plan = plan_round(len(site.train), config)
    expected_batch = int(len(site.train) * plan.sample_rate)
    guess = ReplayableNoise(SEED)
    guess.uniform(len(site.train))  # the Poisson sampling draw
    squares = 0.0
    for p0, p1 in zip(before, after, strict=True):
        noise = guess.gaussian(tuple(p0.shape), z * 1.0, torch.float64)
        recovered = -(expected_batch / config.lr) * (p1.double() - p0.double())
        squares += float((recovered - noise).pow(2).sum())
    return math.sqrt(squares)


def test_coordinator_cannot_reproduce_dpsgd_noise(site, small_model_config):
    """The issue's attack on DP-SGD: knowing the noise of one step, the coordinator recovers
    the sum of clipped per-example gradients (and from it labels and embeddings)."""
    z, lr = 5.0, 1.0
    before, after, config = _one_sgd_step(site, small_model_config, ReplayableNoise(SEED), z,
                                          lr)
    dims = sum(p.numel() for p in before)
    clipped_sum_bound = len(site.train) * 1.0  # N examples, C = 1
    assert _dpsgd_residual(site, before, after, config, z) <= clipped_sum_bound  # control
    before, after, config = _one_sgd_step(site, small_model_config, SecureNoise(), z, lr)
    residual = _dpsgd_residual(site, before, after, config, z)
    assert residual > 0.9 * math.sqrt(2) * z * math.sqrt(dims)
    assert residual > 10 * clipped_sum_bound


def test_secure_noise_has_the_calibrated_distribution():
    """The CSPRNG's Gaussians are N(0, std^2) (mean, std, and a Kolmogorov-Smirnov bound), and
    two sources never draw the same values."""
    from scipy import stats

    draws = SecureNoise().gaussian((200_000,), 2.5, torch.float64).numpy()
    assert abs(draws.mean()) < 0.02 and draws.std() == pytest.approx(2.5, rel=0.01)
    assert stats.kstest(draws / 2.5, "norm").pvalue > 1e-4
    assert not np.array_equal(SecureNoise().gaussian((8,), 1.0).numpy(),
                              SecureNoise().gaussian((8,), 1.0).numpy())


def test_hospital_daemon_refuses_replayable_noise(tmp_path):
    from client.site_folder import SiteFolderError, init_site_folder, load_hospital_config

    init_site_folder(tmp_path, "st-mary")
    config = tmp_path / "hospital.toml"
    config.write_text(config.read_text() + "insecure_replayable_noise = true\n")
    with pytest.raises(SiteFolderError, match="simulations only"):
        load_hospital_config(tmp_path)
