"""The frozen image teacher of Stage 1: a SigLIP-style vision tower run on every frame.

Module and parameter names follow the public HF SigLIP vision-tower layout
(``embeddings.patch_embedding``, ``encoder.layers.{i}.self_attn.q_proj``, ...,
``post_layernorm``, ``head.probe``, ``head.attention.in_proj_weight``, ...), so that a
checkpoint can be loaded by a key mapping (drop the ``vision_model.`` prefix).

The teacher yields, per frame: the l2-normalised hidden states at the input of chosen
layers (the alignment targets), the l2-normalised output of its attention-pooling (MAP)
head, and the MAP head's attention over the patches averaged over heads (the saliency
that drives the semantic mask).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ivfast.ops.attention import attention
from ivfast.ops.dispatch import autocast_off


@dataclass
class TeacherConfig:
    img_size: int = 256
    patch_size: int = 16
    width: int = 1536
    depth: int = 40
    heads: int = 16
    mlp_dim: int = 6144


@dataclass
class TeacherOutput:
    """layers: (K, BT, L, width), l2-normalised inputs of the chosen layers (ascending);
    pooled: (BT, width), l2-normalised MAP-head output; saliency: (BT, L), the MAP head's
    attention over the patches averaged over heads (float32, rows sum to 1)."""

    layers: torch.Tensor
    pooled: torch.Tensor
    saliency: torch.Tensor


def teacher_return_layers(depth: int, k: int, interval: float) -> list[int]:
    """The release's teacher layers for alignment: depth - int(i * interval) - 1, i < k, ascending."""
    return sorted(depth - int(i * interval) - 1 for i in range(k))


def prepare_teacher_input(
    video: torch.Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    teacher_mean: Sequence[float] = (0.5, 0.5, 0.5),
    teacher_std: Sequence[float] = (0.5, 0.5, 0.5),
) -> torch.Tensor:
    """(B, C, T, H, W) video normalised with mean/std -> (B*T, C, size, size) frames
    normalised for the teacher, b-major then t. Frames are resized (bicubic,
    align_corners=False) only when H or W differs from ``size``."""
    if video.dim() != 5:
        raise ValueError(f"video must be (B, C, T, H, W), got shape {tuple(video.shape)}")
    b, c, t, h, w = video.shape
    frames = video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    dtype = frames.dtype
    x = frames.float()

    def _stat(values):
        return torch.as_tensor(values, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)

    x = x * _stat(std) + _stat(mean)
    if h != size or w != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    x = (x - _stat(teacher_mean)) / _stat(teacher_std)
    return x.to(dtype)


class SiglipEmbeddings(nn.Module):
    def __init__(self, img_size: int, patch_size: int, width: int):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.position_embedding = nn.Embedding(self.num_patches, width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"teacher expects {self.img_size}x{self.img_size} frames, got {tuple(pixels.shape[-2:])}"
            )
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (BT, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (BT, L, D), row-major over the patch grid
        return x + self.position_embedding.weight.to(x.dtype)


class SiglipAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self._split(self.q_proj(x)), self._split(self.k_proj(x)), self._split(self.v_proj(x))
        o = attention(q, k, v)  # scale head_dim ** -0.5, as SigLIP
        return self.out_proj(o.transpose(1, 2).reshape(b, n, d))


class SiglipMLP(nn.Module):
    def __init__(self, width: int, mlp_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float = 1e-6):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = SiglipAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = SiglipMLP(width, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, mlp_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(width, heads, mlp_dim) for _ in range(depth))


class SiglipMAPHead(nn.Module):
    """Multihead attention pooling: one learned probe attends over the tokens, then a
    residual MLP. ``attention`` is an ``nn.MultiheadAttention`` used for its parameter
    layout only; the attention itself is computed explicitly here because its weights
    (the saliency) are needed."""

    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.zeros(1, 1, width))
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.layernorm = nn.LayerNorm(width, eps=eps)
        self.mlp = SiglipMLP(width, mlp_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (BT, L, D) -> pooled (BT, D) (not normalised), weights (BT, heads, L) float32."""
        bt, n, d = x.shape
        h, dh = self.heads, d // self.heads
        mha = self.attention
        wq, wk, wv = mha.in_proj_weight.chunk(3, dim=0)
        bq, bk, bv = mha.in_proj_bias.chunk(3, dim=0)
        probe = self.probe.to(x.dtype)
        q = F.linear(probe, wq, bq).view(1, h, dh)  # the same query for every frame
        k = F.linear(x, wk, bk).view(bt, n, h, dh)
        v = F.linear(x, wv, bv).view(bt, n, h, dh)
        with autocast_off(x.device):  # the saliency in float32
            logits = torch.einsum("hc,bnhc->bhn", q[0].float(), k.float()) / math.sqrt(dh)
            weights = logits.softmax(dim=-1)  # (BT, heads, L)
        o = torch.einsum("bhn,bnhc->bhc", weights.to(v.dtype), v).reshape(bt, d)
        o = mha.out_proj(o)
        o = o + self.mlp(self.layernorm(o))
        return o, weights


class SigLIPTeacher(nn.Module):
    """SigLIP-style image tower (pre-norm ViT, MAP head), frozen and run per frame.

    ``return_layers``: layer indices whose *input* hidden states are returned
    (0 = the patch embeddings, ``depth`` = the output of the last layer, before
    ``post_layernorm``).
    """

    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 16,
        width: int = 1536,
        depth: int = 40,
        heads: int = 16,
        mlp_dim: int = 6144,
        return_layers: Sequence[int] = (),
    ):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.width = width
        self.depth = depth
        self.heads = heads
        layers = sorted(int(i) for i in return_layers)
        if len(set(layers)) != len(layers):
            raise ValueError(f"return_layers has duplicates: {list(return_layers)}")
        if any(i < 0 or i > depth for i in layers):
            raise ValueError(f"return_layers {layers} must lie in [0, {depth}]")
        self.return_layers = layers
        self.embeddings = SiglipEmbeddings(img_size, patch_size, width)
        self.encoder = SiglipEncoder(width, depth, heads, mlp_dim)
        self.post_layernorm = nn.LayerNorm(width, eps=1e-6)
        self.head = SiglipMAPHead(width, heads, mlp_dim)
        self._frozen = False
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: TeacherConfig, return_layers: Sequence[int] = ()) -> "SigLIPTeacher":
        return cls(img_size=cfg.img_size, patch_size=cfg.patch_size, width=cfg.width, depth=cfg.depth,
                   heads=cfg.heads, mlp_dim=cfg.mlp_dim, return_layers=return_layers)

    @property
    def num_patches(self) -> int:
        return self.embeddings.num_patches

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init (a stand-in until real weights are loaded)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        pe = self.embeddings.patch_embedding
        nn.init.normal_(pe.weight, std=1.0 / math.sqrt(pe.in_channels * self.patch_size**2))
        nn.init.zeros_(pe.bias)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=1.0 / math.sqrt(self.width))
        nn.init.normal_(self.head.probe, std=0.02)
        mha = self.head.attention
        nn.init.normal_(mha.in_proj_weight, std=0.02)
        nn.init.zeros_(mha.in_proj_bias)

    def freeze(self) -> "SigLIPTeacher":
        """No parameter needs a gradient, and the module stays in eval mode (``train()`` on
        a parent module does not switch it back)."""
        for p in self.parameters():
            p.requires_grad_(False)
        self._frozen = True
        return super().train(False)

    def train(self, mode: bool = True) -> "SigLIPTeacher":
        return super().train(False if self._frozen else mode)

    def forward(self, pixels: torch.Tensor) -> TeacherOutput:
        """pixels (BT, 3, S, S), prepared by :func:`prepare_teacher_input`."""
        x = self.embeddings(pixels)
        wanted = set(self.return_layers)
        taken = []
        for i, layer in enumerate(self.encoder.layers):
            if i in wanted:
                taken.append(x)
            x = layer(x)
        if self.depth in wanted:
            taken.append(x)
        if taken:
            layers = torch.stack([F.normalize(t.float(), dim=-1).to(t.dtype) for t in taken])
        else:
            layers = x.new_zeros(0, *x.shape)
        x = self.post_layernorm(x)
        pooled, weights = self.head(x)
        pooled = F.normalize(pooled.float(), dim=-1).to(pooled.dtype)
        return TeacherOutput(layers=layers, pooled=pooled, saliency=weights.mean(dim=1))
