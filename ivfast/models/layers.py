"""Transformer building blocks of the video ViT, in two styles chosen by a string:

- ``"plain"`` (the paper's supplement): pre-norm LayerNorm, MHSA with qkv bias, GELU MLP, no
  LayerScale;
- ``"release"`` (the authors' release): pre-norm RMSNorm, attention without qkv bias and with
  QK-norm (RMSNorm over the full q and k width, before splitting heads), LayerScale, GELU MLP.

Norm modules are named ``*norm*`` (the optimiser's no-weight-decay rule).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ivfast.ops import lean
from ivfast.ops.attention import attention
from ivfast.ops.rmsnorm import rmsnorm

BLOCK_STYLES = ("plain", "release")


def count_parameters(module: nn.Module, trainable: bool | None = None) -> int:
    """Scalar parameters of ``module``, each shared one once: all (None), trainable only (True) or
    frozen only (False). A ZeRO-3 partitioned parameter counts its full size (``ds_numel``)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()
               if trainable is None or p.requires_grad == trainable)


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim in float32; output in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerScale(nn.Module):
    """``x * gamma`` per channel in float32; output in x's dtype."""

    def __init__(self, dim: int, init: float = 1e-5):
        super().__init__()
        self.init = init
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lean.layer_scale(x, self.gamma)

    def extra_repr(self) -> str:
        return f"{self.gamma.shape[0]}, init={self.init}"


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``p`` and
    scale the kept ones by 1 / (1 - p). Identity in eval or when p == 0."""

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


GELUS = ("tanh", "erf")


class Mlp(nn.Module):
    """Linear -> GELU -> Linear; ``gelu``: "erf" (exact) or "tanh" (the approximation the
    release's fused MLP computes, flash-attn's ``gelu_approx``)."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, gelu: str = "erf"):
        super().__init__()
        if gelu not in GELUS:
            raise ValueError(f"gelu must be one of {GELUS}, got {gelu!r}")
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim or dim)
        self.gelu = gelu
        self._approximate = "tanh" if gelu == "tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lean.gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self._approximate)

    def extra_repr(self) -> str:
        return f"gelu={self.gelu!r}"


class Attention(nn.Module):
    """Multi-head self-attention over (B, N, dim); ``qk_norm``: RMSNorm over the full q and k
    width before splitting into heads."""

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
    """Pre-norm block: ``x + DropPath(LS(attn(norm1(x))))``, then the same with the MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, style: str = "release",
                 drop_path: float = 0.0, layer_scale_init: float | None = 1e-5, gelu: str = "erf"):
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
        self.mlp = Mlp(dim, int(dim * mlp_ratio), gelu=gelu)
        self.ls2 = LayerScale(dim, layer_scale_init) if use_ls else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
