"""The Stage-1 predictor: an input projection and a stack of ModernBERT-style layers.

The release uses the last layers (23..27 of 28) of ModernBERT-large: pre-norm blocks with
bias-free LayerNorm, fused bias-free Wqkv, rotary position embeddings (rotate-half
convention) over the flattened token sequence, GeGLU MLP, and alternating attention:
layers whose absolute id is a multiple of ``global_every`` attend globally (RoPE theta
160000), the others within a sliding window of ``window`` tokens (half-width
``window // 2``, RoPE theta 10000). There is no final norm.

Parameter names follow HF ModernBERT's layer layout (``layers.{i}.attn_norm``,
``layers.{i}.attn.Wqkv``, ``layers.{i}.attn.Wo``, ``layers.{i}.mlp_norm``,
``layers.{i}.mlp.Wi``, ``layers.{i}.mlp.Wo``), so that layer ``first_layer_id + i`` of a
ModernBERT checkpoint maps onto ``layers.{i}``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ivfast.models.heads import MLPHead
from ivfast.ops import lean
from ivfast.ops.attention import attention
from ivfast.ops.token_gather import gather_tokens, scatter_with_mask_token


@dataclass
class PredictorConfig:
    width: int = 1024
    depth: int = 5
    heads: int = 16
    mlp_hidden: int = 2624
    window: int = 128
    global_every: int = 3
    first_layer_id: int = 23


def rope_tables(n: int, head_dim: int, theta: float, device, dtype=torch.float32):
    """cos, sin tables (n, head_dim) for positions 0..n-1 (rotate-half layout: the
    frequencies repeated over both halves), computed in float32 then cast to ``dtype``."""
    if head_dim % 2 != 0:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(n, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, Dh), cos/sin (N, Dh)."""
    return x * cos + _rotate_half(x) * sin


class ModernBertAttention(nn.Module):
    def __init__(self, width: int, heads: int, window: int | None):
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.window = window  # half-width handed to attention(); None = global
        self.Wqkv = nn.Linear(width, 3 * width, bias=False)
        self.Wo = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.attend(self.Wqkv(x), cos, sin)

    def attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The attention after Wqkv: ``qkv`` (B, N, 3 * width) -> (B, N, width)."""
        b, n, _ = qkv.shape
        qkv = qkv.view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, Dh) each
        # v on its own storage ((B, N, H, Dh) rows, flash-attn's layout): attention keeps v for
        # backward, and a view would keep the whole Wqkv output alive next to the RoPE'd q, k.
        v = v.transpose(1, 2).contiguous().transpose(1, 2)
        q = apply_rope(q, cos.to(q.dtype), sin.to(q.dtype))
        k = apply_rope(k, cos.to(k.dtype), sin.to(k.dtype))
        o = attention(q, k, v, window=self.window)
        return self.Wo(o.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class ModernBertMLP(nn.Module):
    """GeGLU: Wi -> (input, gate); Wo(GELU(input) * gate), erf GELU."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.Wi = nn.Linear(width, 2 * hidden, bias=False)
        self.Wo = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lean.geglu_mlp(x, self.Wi.weight, self.Wo.weight)


class ModernBertLayer(nn.Module):
    def __init__(
        self,
        width: int,
        heads: int,
        mlp_hidden: int,
        layer_id: int,
        is_global: bool,
        window: int,
        rope_theta: float,
        norm_eps: float,
    ):
        super().__init__()
        self.layer_id = layer_id
        self.is_global = is_global
        self.rope_theta = rope_theta
        self.attn_norm = nn.LayerNorm(width, eps=norm_eps, bias=False)
        self.attn = ModernBertAttention(width, heads, None if is_global else window // 2)
        self.mlp_norm = nn.LayerNorm(width, eps=norm_eps, bias=False)
        self.mlp = ModernBertMLP(width, mlp_hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # each norm runs with the Linear after it (lean saves: the norm's output is not kept)
        an, mn = self.attn_norm, self.mlp_norm
        x = x + self.attn.attend(lean.norm_linear(x, an.weight, an.bias, an.eps, self.attn.Wqkv.weight), cos, sin)
        return x + lean.norm_geglu_mlp(x, mn.weight, mn.bias, mn.eps, self.mlp.Wi.weight, self.mlp.Wo.weight)


class Predictor(nn.Module):
    """Input projection + ``depth`` ModernBERT layers with absolute ids
    ``first_layer_id .. first_layer_id + depth - 1``; forward (B, N, in_dim) -> (B, N, width)."""

    def __init__(
        self,
        in_dim: int,
        width: int = 1024,
        depth: int = 5,
        heads: int = 16,
        mlp_hidden: int = 2624,
        window: int = 128,
        global_every: int = 3,
        first_layer_id: int = 23,
        rope_theta_global: float = 160000.0,
        rope_theta_local: float = 10000.0,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.in_dim = in_dim
        self.width = width
        self.heads = heads
        self.window = window
        self.in_proj = MLPHead(in_dim, width, l2=False)  # the release's input projection
        layers = []
        for i in range(depth):
            layer_id = first_layer_id + i
            is_global = layer_id % global_every == 0
            theta = rope_theta_global if is_global else rope_theta_local
            layers.append(
                ModernBertLayer(width, heads, mlp_hidden, layer_id, is_global, window, theta, norm_eps)
            )
        self.layers = nn.ModuleList(layers)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: PredictorConfig, in_dim: int) -> "Predictor":
        """The predictor of ``cfg`` over ``in_dim``-wide encoder tokens (Stages 1 and 2)."""
        return cls(in_dim=in_dim, width=cfg.width, depth=cfg.depth, heads=cfg.heads, mlp_hidden=cfg.mlp_hidden,
                   window=cfg.window, global_every=cfg.global_every, first_layer_id=cfg.first_layer_id)

    @property
    def global_layers(self) -> list[int]:
        """Indices (into ``layers``) of the layers with global attention."""
        return [i for i, layer in enumerate(self.layers) if layer.is_global]

    @property
    def layer_ids(self) -> list[int]:
        """Absolute (ModernBERT) layer ids of ``layers``."""
        return [layer.layer_id for layer in self.layers]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.in_proj.reset_parameters()
        for m in self.layers.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, in_dim): the full token sequence (mask tokens and positions already in)."""
        x = self.in_proj(x)
        n = x.shape[1]
        head_dim = self.width // self.heads
        tables = {}  # one cos/sin pair per theta per forward
        for layer in self.layers:
            if layer.rope_theta not in tables:
                tables[layer.rope_theta] = rope_tables(n, head_dim, layer.rope_theta, x.device)
            cos, sin = tables[layer.rope_theta]
            x = layer(x, cos, sin)
        return x


def predict_masked(predictor: nn.Module, pos_table: torch.Tensor, mask_token: torch.Tensor, enc,
                   visible_idx: torch.Tensor, masked_idx: torch.Tensor) -> torch.Tensor:
    """The predictor over the full sequence; its output at ``masked_idx`` (B, N_mask, width).

    The sequence is ``[CLS tokens + pos_cls | encoder tokens at visible_idx, mask_token elsewhere,
    + pos]``; ``pos_table`` (num_cls + N, D) has the CLS rows first; ``enc`` an ``EncoderOutput``.
    """
    ncls = enc.num_cls
    seq = scatter_with_mask_token(enc.tokens[:, ncls:], visible_idx, mask_token, pos_table[ncls:])
    if ncls:
        seq = torch.cat([enc.tokens[:, :ncls] + pos_table[:ncls].to(seq.dtype), seq], dim=1)
    z = predictor(seq)[:, ncls:]
    return gather_tokens(z, masked_idx)
