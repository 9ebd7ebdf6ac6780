"""TinyViT-5M as LiteMedSAM's image encoder, in plain torch (no timm).

Written from MedSAM's ``tiny_vit_sam.py`` (bowang-lab/MedSAM, branch LiteMedSAM; itself
MobileSAM's variant of Microsoft's TinyViT, Apache-2.0), keeping its module names so the
published state dict loads with ``strict=True``. Only what inference and frozen use need is here:
no stochastic depth (LiteMedSAM's rate is 0), no checkpointing, no layer-wise learning rates.

Shapes at LiteMedSAM's settings (input ``(B, 3, 256, 256)`` in [0, 1]):
patch embedding (1x1 convolutions, no downsampling) ``(B, 64, 256, 256)``; stage 0 (MBConv)
then merge to ``(B, 128*128, 128)``; stage 1 (window 7) then merge to ``(B, 64*64, 160)``; stage
2 (window 14) then merge with stride 1 to ``(B, 64*64, 320)``; stage 3 (window 7); neck to
``(B, 256, 64, 64)``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

EMBED_DIMS = (64, 128, 160, 320)
DEPTHS = (2, 2, 6, 2)
NUM_HEADS = (2, 4, 5, 10)
WINDOW_SIZES = (7, 7, 14, 7)
IMAGE_SIZE = 256
EMBEDDING_SIZE = 64
"""Side of the encoder's output grid (``IMAGE_SIZE / 4``)."""
NECK_DIM = 256
STRIDE1_MERGE_DIMS = (320, 448, 576)
"""Output widths whose patch merging keeps the resolution (MobileSAM's rule)."""


class Conv2dBN(nn.Sequential):
    """Convolution without bias then BatchNorm (state-dict names ``c`` and ``bn``)."""

    def __init__(self, a: int, b: int, ks: int = 1, stride: int = 1, pad: int = 0,
                 groups: int = 1, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, 1, groups, bias=False))
        bn = nn.BatchNorm2d(b)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0)
        self.add_module("bn", bn)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of ``(B, C, H, W)`` (SAM's)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    """``(B, 3, S, S)`` -> ``(B, dim, S, S)``: two 1x1 Conv-BN with GELU between."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(Conv2dBN(in_chans, dim // 2), nn.GELU(), Conv2dBN(dim // 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual ``(B, C, H, W) -> (B, C, H, W)``: 1x1 expand, 3x3 depthwise, 1x1."""

    def __init__(self, dim: int, expand_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, ks=3, pad=1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, dim, bn_weight_init=0.0)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.act3(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Tokens ``(B, H*W, C)`` or maps ``(B, C, H, W)`` -> tokens ``(B, H'*W', out_dim)``
    (``H' = H/2``, or ``H`` for the widths in :data:`STRIDE1_MERGE_DIMS`)."""

    def __init__(self, resolution: int, dim: int, out_dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.act = nn.GELU()
        self.conv1 = Conv2dBN(dim, out_dim)
        stride = 1 if out_dim in STRIDE1_MERGE_DIMS else 2
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x.view(len(x), self.resolution, self.resolution, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.conv3(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Pre-norm MLP on tokens ``(B, N, C) -> (B, N, C)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


def _bias_index(window: int) -> tuple[int, torch.Tensor]:
    """Number of distinct (|dy|, |dx|) offsets in a window and the ``(N, N)`` index of each
    token pair's offset, numbered in first-seen order (TinyViT's, so the biases load)."""
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    index = []
    for p1 in points:
        for p2 in points:
            offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            index.append(offsets.setdefault(offset, len(offsets)))
    return len(offsets), torch.tensor(index, dtype=torch.long).view(len(points), len(points))


class Attention(nn.Module):
    """Pre-norm multi-head self-attention within one window, with learnt relative biases.

    ``(B, N, C) -> (B, N, C)`` with ``N = window**2``; heads of width ``C / num_heads``.
    The fused ``qkv`` output is laid out per head as ``[q, k, v]`` (TinyViT's order).
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.scale = self.key_dim ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        count, index = _bias_index(window)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, count))
        self.register_buffer("attention_bias_idxs", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, -1)
        q, k, v = (t.permute(0, 2, 1, 3) for t in qkv.split([self.key_dim] * 3, dim=3))
        bias = self.attention_biases[:, self.attention_bias_idxs]
        attn = ((q @ k.transpose(-2, -1)) * self.scale + bias).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def _windows(x: torch.Tensor, size: int, window: int) -> tuple[torch.Tensor, int]:
    """``(B, H, W, C)`` (``H = W = size``) zero-padded to a multiple of ``window`` and cut into
    ``(B * n * n, window**2, C)``; returns them and ``n`` (windows per side)."""
    b, _, _, c = x.shape
    pad = (window - size % window) % window
    if pad:
        x = F.pad(x, (0, 0, 0, pad, 0, pad))
    n = (size + pad) // window
    x = x.view(b, n, window, n, window, c).transpose(2, 3)
    return x.reshape(b * n * n, window * window, c), n


class TinyViTBlock(nn.Module):
    """Windowed attention, depthwise 3x3 Conv-BN, MLP; tokens ``(B, S*S, C)`` in and out."""

    def __init__(self, dim: int, resolution: int, num_heads: int, window: int,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = Attention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, ks=3, pad=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, w = self.resolution, self.window
        b, length, c = x.shape
        if s == w:
            y = self.attn(x)
        else:
            windows, n = _windows(x.view(b, s, s, c), s, w)
            y = self.attn(windows).view(b, n, n, w, w, c).transpose(2, 3)
            y = y.reshape(b, n * w, n * w, c)[:, :s, :s].reshape(b, length, c)
        x = x + y
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, s, s))
        x = x.view(b, c, length).transpose(1, 2)
        return x + self.mlp(x)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks on maps, then patch merging to tokens."""

    def __init__(self, dim: int, resolution: int, depth: int, out_dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim) for _ in range(depth))
        self.downsample = PatchMerging(resolution, dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class BasicLayer(nn.Module):
    """Stages 1-3: TinyViT blocks on tokens, then patch merging (not after the last stage)."""

    def __init__(self, dim: int, resolution: int, depth: int, num_heads: int, window: int,
                 out_dim: int | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, resolution, num_heads, window)
                                    for _ in range(depth))
        self.downsample = (PatchMerging(resolution, dim, out_dim) if out_dim is not None
                           else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


def _init_weights(module: nn.Module) -> None:
    """TinyViT's initialisation (the random-init control's)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)
    elif isinstance(module, nn.LayerNorm):
        nn.init.constant_(module.bias, 0)
        nn.init.constant_(module.weight, 1.0)


class TinyViT(nn.Module):
    """LiteMedSAM's image encoder: ``(B, 3, 256, 256)`` in [0, 1] -> ``(B, 256, 64, 64)``."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(3, EMBED_DIMS[0])
        resolutions = (IMAGE_SIZE, IMAGE_SIZE // 2, IMAGE_SIZE // 4, IMAGE_SIZE // 4)
        self.layers = nn.ModuleList([ConvLayer(EMBED_DIMS[0], resolutions[0], DEPTHS[0],
                                               EMBED_DIMS[1])])
        for i in range(1, len(DEPTHS)):
            out_dim = EMBED_DIMS[i + 1] if i + 1 < len(DEPTHS) else None
            self.layers.append(BasicLayer(EMBED_DIMS[i], resolutions[i], DEPTHS[i],
                                          NUM_HEADS[i], WINDOW_SIZES[i], out_dim))
        self.apply(_init_weights)
        self.neck = nn.Sequential(
            nn.Conv2d(EMBED_DIMS[-1], NECK_DIM, kernel_size=1, bias=False),
            LayerNorm2d(NECK_DIM),
            nn.Conv2d(NECK_DIM, NECK_DIM, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(NECK_DIM),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        x = x.view(b, EMBEDDING_SIZE, EMBEDDING_SIZE, c).permute(0, 3, 1, 2)
        return self.neck(x)
