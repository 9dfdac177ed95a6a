"""Alignment heads: the per-layer MLP projection, attention pooling, and the cosine loss."""
from __future__ import annotations

import torch
import torch.nn as nn

from ivfast.ops import lean
from ivfast.ops.attention import attention


class MLPHead(nn.Module):
    """Linear -> GELU -> Linear -> LayerNorm(out) -> optional l2 normalisation.

    ``hidden`` defaults to ``in_dim``. With ``l2=True`` the output has unit norm over the
    last dim (alignment heads); ``l2=False`` is the predictor's input projection.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None, l2: bool = True):
        super().__init__()
        hidden = hidden or in_dim
        self.l2 = l2
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        self.norm.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = lean.gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        if self.l2:
            return lean.layer_norm_l2(x, self.norm.weight, self.norm.bias, self.norm.eps)
        return self.norm(x)


class AttentionPool(nn.Module):
    """Pool (B, N, dim) tokens to (B, out_dim) by cross-attention from their mean.

    The query input is the token mean; query, key and value inputs each have their own
    LayerNorm; q/k/v projections have no Linear bias but separate learnable bias vectors
    (zero at init); the attended vector is projected to ``out_dim``. Invariant to the
    order of the tokens.
    """

    def __init__(self, dim: int, heads: int, out_dim: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_k = nn.LayerNorm(dim)
        self.norm_v = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, out_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for lin in (self.q, self.k, self.v, self.proj):
            nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(self.proj.bias)
        for b in (self.q_bias, self.k_bias, self.v_bias):
            nn.init.zeros_(b)
        for n in (self.norm_q, self.norm_k, self.norm_v):
            n.reset_parameters()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(self.norm_q(x.mean(dim=1, keepdim=True))) + self.q_bias  # (B, 1, dim)
        k = self.k(self.norm_k(x)) + self.k_bias
        v = self.v(self.norm_v(x)) + self.v_bias
        out = attention(self._heads(q), self._heads(k), self._heads(v))  # (B, H, 1, Dh)
        return self.proj(out.transpose(1, 2).reshape(x.shape[0], -1))


def cosine_align_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean(2 - 2 * <pred, target>) over all leading dims, in float32, a 0-dim tensor; both inputs
    already l2-normalised."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return lean.cosine_align(pred, target)
