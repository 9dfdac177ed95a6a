"""Transformer building blocks for the video ViT.

Two block styles, chosen by a string:

- ``"plain"`` (the paper's supplement): pre-norm LayerNorm, MHSA with qkv bias, GELU MLP,
  no LayerScale.
- ``"release"`` (the authors' release): pre-norm RMSNorm, attention without qkv bias and
  with QK-norm (RMSNorm over the full q and k width, before splitting heads), LayerScale,
  GELU MLP.

Both use stochastic depth (``DropPath``); the per-block rates are set by the caller.
Module names follow the optimiser's no-weight-decay rules: norms contain ``norm``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ivfast.models import lean_mlp
from ivfast.models.attention import attention

BLOCK_STYLES = ("plain", "release")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``module`` (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, computed in fp32; output has the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    fused = False  # set by VideoEncoder(fused=True): the kernel of kernels.rmsnorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from kernels.rmsnorm import rmsnorm

            return rmsnorm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` applied in fp32; output has the input dtype."""

    def __init__(self, dim: int, init: float = 1e-5):
        super().__init__()
        self.init = init
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init)

    lean = False  # set by VideoEncoder(lean_mlp=True): ivfast.models.lean_mlp.layer_scale (same values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean and lean_mlp.usable(x):
            return lean_mlp.layer_scale(x, self.gamma)
        return (x.float() * self.gamma.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.gamma.shape[0]}, init={self.init}"


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``p``
    and scale the kept ones by 1 / (1 - p). Identity in eval or when p == 0."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    lean = False  # set by VideoEncoder(lean_mlp=True): ivfast.models.lean_mlp (same values, less saved)

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if lean_mlp.mlp_applies(self, x):
            return lean_mlp.gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention over (B, N, dim) through the shared attention entry point.

    ``qk_norm``: RMSNorm over the full q and k width before splitting into heads.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = RMSNorm(dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.reshape(b, n, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        out = attention(q, k, v)  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(LS(attn(norm1(x)))), then the same with the MLP."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        style: str = "release",
        drop_path: float = 0.0,
        layer_scale_init: float | None = 1e-5,
    ):
        super().__init__()
        if style not in BLOCK_STYLES:
            raise ValueError(f"block style must be one of {BLOCK_STYLES}, got {style!r}")
        release = style == "release"
        norm = (lambda: RMSNorm(dim, eps=1e-6)) if release else (lambda: nn.LayerNorm(dim))
        use_ls = release and layer_scale_init is not None
        self.norm1 = norm()
        self.attn = Attention(dim, heads, qkv_bias=not release, qk_norm=release)
        self.ls1 = LayerScale(dim, layer_scale_init) if use_ls else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = norm()
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init) if use_ls else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
