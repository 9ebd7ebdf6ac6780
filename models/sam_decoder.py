"""SAM's prompt encoder and mask decoder (two-way transformer), as LiteMedSAM uses them.

Written from ``segment_anything/modeling`` (Meta, Apache-2.0; the copy on MedSAM's LiteMedSAM
branch), keeping module names so the published state dict loads with ``strict=True``. Only box
prompts and single-mask output are wired (no points, no mask prompts): what medfed uses.

Shapes: image embeddings ``(B, 256, 64, 64)``; a box ``(B, 4)`` as ``x0, y0, x1, y1`` in pixels of
the 256 x 256 model input; mask logits ``(B, 1, 256, 256)`` (the decoder upsamples 4x).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.tinyvit import EMBEDDING_SIZE, IMAGE_SIZE, LayerNorm2d

DIM = 256
MASK_IN_CHANS = 16
NUM_MASK_TOKENS = 4
"""SAM's three multimask outputs plus the single-mask one (index 0, the one used here)."""
MLP_DIM = 2048
HEADS = 8
DEPTH = 2


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of 2D coordinates with a fixed random Gaussian matrix ``(2, D/2)``."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix",
                             torch.randn((2, num_pos_feats)))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """``(..., 2)`` coordinates in [0, 1] -> ``(..., D)``."""
        coords = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def grid(self, size: int) -> torch.Tensor:
        """``(D, size, size)`` encoding of the cell centres of a square grid."""
        cells = (torch.arange(size, dtype=torch.float32,
                              device=self.positional_encoding_gaussian_matrix.device) + 0.5) / size
        y, x = torch.meshgrid(cells, cells, indexing="ij")
        return self.encode(torch.stack([x, y], dim=-1)).permute(2, 0, 1)


class PromptEncoder(nn.Module):
    """Box prompts ``(B, 4)`` -> sparse ``(B, 2, 256)`` and dense ``(B, 256, 64, 64)`` embeddings.

    ``mask_downscaling`` and the point embeddings 0-1 are loaded but unused (no mask or point
    prompts here).
    """

    def __init__(self) -> None:
        super().__init__()
        self.pe_layer = PositionEmbeddingRandom(DIM // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, DIM) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, DIM)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, MASK_IN_CHANS // 4, kernel_size=2, stride=2),
            LayerNorm2d(MASK_IN_CHANS // 4), nn.GELU(),
            nn.Conv2d(MASK_IN_CHANS // 4, MASK_IN_CHANS, kernel_size=2, stride=2),
            LayerNorm2d(MASK_IN_CHANS), nn.GELU(),
            nn.Conv2d(MASK_IN_CHANS, DIM, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, DIM)

    def dense_pe(self) -> torch.Tensor:
        """``(1, 256, 64, 64)`` positional encoding of the image embedding's grid."""
        return self.pe_layer.grid(EMBEDDING_SIZE).unsqueeze(0)

    def forward(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        corners = ((boxes.float() + 0.5) / IMAGE_SIZE).reshape(-1, 2, 2)
        sparse = self.pe_layer.encode(corners)
        sparse = torch.stack([sparse[:, 0] + self.point_embeddings[2].weight[0],
                              sparse[:, 1] + self.point_embeddings[3].weight[0]], dim=1)
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            len(boxes), -1, EMBEDDING_SIZE, EMBEDDING_SIZE)
        return sparse, dense


class MLPBlock(nn.Module):
    """``lin1``, activation, ``lin2``: ``(..., D) -> (..., D)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class Attention(nn.Module):
    """Multi-head attention with projections to ``dim / downsample`` channels:
    ``q (B, Nq, D)``, ``k, v (B, Nk, D)`` -> ``(B, Nq, D)``. LoRA targets its
    ``q_proj``/``k_proj``/``v_proj``/``out_proj``."""

    def __init__(self, dim: int, num_heads: int, downsample: int = 1) -> None:
        super().__init__()
        inner = dim // downsample
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(
            self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, tokens -> image, token MLP, image -> tokens (each with a norm)."""

    def __init__(self, skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = Attention(DIM, HEADS)
        self.norm1 = nn.LayerNorm(DIM)
        self.cross_attn_token_to_image = Attention(DIM, HEADS, downsample=2)
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = MLPBlock(DIM, MLP_DIM)
        self.norm3 = nn.LayerNorm(DIM)
        self.norm4 = nn.LayerNorm(DIM)
        self.cross_attn_image_to_token = Attention(DIM, HEADS, downsample=2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Image ``(B, 256, 64, 64)`` + its PE + tokens ``(B, T, 256)`` -> tokens ``(B, T, 256)``
    and image tokens ``(B, 4096, 256)``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TwoWayAttentionBlock(i == 0) for i in range(DEPTH))
        self.final_attn_token_to_image = Attention(DIM, HEADS, downsample=2)
        self.norm_final_attn = nn.LayerNorm(DIM)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor,
                tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = image.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        out = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + out), keys


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between (SAM's hypernetwork and IoU head)."""

    def __init__(self, dim: int, hidden: int, out: int, num_layers: int) -> None:
        super().__init__()
        sizes = [dim] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(
            sizes, [*sizes[1:], out], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskDecoder(nn.Module):
    """Image embeddings + prompt embeddings -> ``(B, 1, 256, 256)`` mask logits (SAM's
    single-mask output, token 0) and ``(B, 1)`` predicted IoU."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer()
        self.iou_token = nn.Embedding(1, DIM)
        self.mask_tokens = nn.Embedding(NUM_MASK_TOKENS, DIM)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(DIM, DIM // 4, kernel_size=2, stride=2),
            LayerNorm2d(DIM // 4), nn.GELU(),
            nn.ConvTranspose2d(DIM // 4, DIM // 8, kernel_size=2, stride=2), nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(DIM, DIM, DIM // 8, 3) for _ in range(NUM_MASK_TOKENS))
        self.iou_prediction_head = MLP(DIM, 256, NUM_MASK_TOKENS, 3)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output.unsqueeze(0).expand(len(sparse), -1, -1), sparse], dim=1)
        src = image + dense
        b, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe.expand(b, -1, -1, -1), tokens)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = self.output_hypernetworks_mlps[0](hs[:, 1])  # single-mask token only
        _, cu, hu, wu = upscaled.shape
        masks = (hyper.unsqueeze(1) @ upscaled.view(b, cu, hu * wu)).view(b, 1, hu, wu)
        return masks, self.iou_prediction_head(hs[:, 0])[:, :1]
