"""Per-token diffusion reconstruction head (Stage 1, "Diffusion recon").

A small denoiser ``SimpleMLP`` predicts the noise added to a target token x (e.g. a 3x14x14
pixel patch, 588 channels) from the noised token x_t, the timestep t and a condition z::

    y = TimestepEmbedder(t) + Linear(z);  h = Linear(x_t)
    repeat depth: shift, scale, gate = Linear(SiLU(y)).chunk(3)
                  h = h + gate * MLP(LN(h) * (1 + scale) + shift)
    shift, scale = Linear(SiLU(y)).chunk(2);  out = Linear(LN(h) * (1 + scale) + shift)

SiLU(y) is computed once and shared by every adaLN projection (:mod:`ivfast.ops.adaln`). The
adaLN projections and the output start at zero, so the initial output is 0. The head's network
computes in its inputs' dtype; ``precision="fp32"`` upcasts them and turns autocast off, so a
head whose parameters are kept in bf16 still computes in fp32 (gradients reach the bf16
parameters through the casts).

The loss arithmetic is float32 in every precision mode and on every path (plain, chunked,
fused kernels): the eps-MSE accumulates in float32 (:mod:`ivfast.ops.diffusion_noise`), and the
variational-bound term upcasts the network's output, the target and x_t and runs every step
in float32 with autocast off (:meth:`GaussianDiffusion.vb_terms_bpd`), because in bfloat16
(8-bit mantissa) the differences of nearby log-variances and their exponentials keep only
2-3 significant digits: the term's mean came out 14-30% high and its gradient on z at cosine
0.6-0.83 to float32's. Under ``precision="auto"`` only the network runs in the training
dtype; the returned losses are float32 (float64 for a float64 head).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Dict, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ivfast.models.diffusion import GaussianDiffusion
from ivfast.ops import lean
from ivfast.ops.adaln import adaln_block, adaln_final
from ivfast.ops.chunked_loss import chunked_row_loss
from ivfast.ops.diffusion_noise import eps_mse, q_sample
from ivfast.ops.dispatch import autocast_off
from ivfast.ops.timestep_embedding import timestep_embedding

PRECISIONS = ("auto", "fp32")


@dataclass
class DiffusionConfig:
    width: int = 1536
    depth: int = 6
    num_timesteps: int = 1000
    schedule: Literal["cosine", "linear"] = "cosine"
    learn_sigma: bool = True
    batch_mul: int = 1
    precision: Literal["auto", "fp32"] = "auto"  # fp32: the head computes in fp32 (the release) under bf16 training
    # > 0: loss and gradients computed this many rows at a time in the forward, only the gradients
    # kept for backward (ivfast.ops.chunked_loss); 0: plain autograd. Not under ZeRO-3.
    chunk_rows: int = 8192


class CastLinear(nn.Linear):
    """``nn.Linear`` computing in its input's dtype (the parameters are cast on use)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class CastLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computing in its input's dtype (the affine parameters are cast on use)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class TimestepEmbedder(nn.Module):
    """timestep_embedding(t, freq_dim) -> Linear(freq_dim, w) -> SiLU -> Linear(w, w)."""

    def __init__(self, width: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(CastLinear(frequency_embedding_size, width), nn.SiLU(), CastLinear(width, width))

    def forward(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(M,) -> (M, width) in ``dtype`` (default: the parameters' dtype)."""
        emb = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(emb.to(dtype or self.mlp[0].weight.dtype))


class AdaLNBlock(nn.Module):
    """Residual MLP block modulated by the condition: ``forward(x, silu_y)`` with silu_y = SiLU(y)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.norm = CastLayerNorm(width, eps=1e-6, elementwise_affine=True)
        self.mlp = nn.Sequential(CastLinear(width, width), nn.SiLU(), CastLinear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), CastLinear(width, 3 * width))

    def forward(self, x: torch.Tensor, silu_y: torch.Tensor) -> torch.Tensor:
        ada, l1, l2, norm = self.adaLN_modulation[1], self.mlp[0], self.mlp[2], self.norm
        return adaln_block(x, silu_y, ada.weight, ada.bias, norm.weight, norm.bias, l1.weight, l1.bias,
                           l2.weight, l2.bias, eps=norm.eps)


class FinalLayer(nn.Module):
    """Affine-free LayerNorm, adaLN (shift, scale) from y, then Linear(w, out_channels)."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = CastLayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), CastLinear(width, 2 * width))
        self.linear = CastLinear(width, out_channels)

    def forward(self, x: torch.Tensor, silu_y: torch.Tensor) -> torch.Tensor:
        ada = self.adaLN_modulation[1]
        return adaln_final(x, silu_y, ada.weight, ada.bias, self.linear.weight, self.linear.bias,
                           eps=self.norm_final.eps)


class SimpleMLP(nn.Module):
    """Denoiser: (x_t (M, in), t (M,), z (M, z_channels)) -> (M, out_channels), in x_t's dtype."""

    def __init__(self, in_channels: int, width: int, out_channels: int, z_channels: int, depth: int):
        super().__init__()
        self.in_channels, self.width, self.out_channels = in_channels, width, out_channels
        self.z_channels, self.depth = z_channels, depth
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = CastLinear(z_channels, width)
        self.input_proj = CastLinear(in_channels, width)
        self.res_blocks = nn.ModuleList([AdaLNBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        silu_y = F.silu(self.time_embed(t, x_t.dtype) + self.cond_embed(z))
        h = self.input_proj(x_t)
        for block in self.res_blocks:
            h = block(h, silu_y)
        return self.final_layer(h, silu_y)


def _vb_terms(diffusion: GaussianDiffusion, c: int, model_output, target, x_t, t):
    """The variational-bound term per row, float32 (M,) whatever ``model_output``'s dtype (see the
    module docstring); its gradient reaches only the variance half, in that half's dtype."""
    frozen = torch.cat([model_output[:, :c].detach(), model_output[:, c:]], dim=1)
    return diffusion.vb_terms_bpd(frozen, target, x_t, t)


class DiffusionLoss(nn.Module):
    """Diffusion reconstruction loss of target rows (M, C) conditioned on z (M, z_channels).

    ``forward(z, target, t, seeds)`` takes each row's timestep t (M,) and Philox noise seed (M,)
    (drawn by the caller; eps[r, c] = ``tl.randn(seeds[r], c)``, never stored) and returns the
    scalar means {"loss", "mse"} (+ "vb" with ``learn_sigma``). With ``chunk_rows`` > 0, under
    autograd, the loss and its backward run ``chunk_rows`` rows at a time inside the forward and
    only the gradients are kept (:mod:`ivfast.ops.chunked_loss`; the same values).
    """

    def __init__(self, target_channels: int, z_channels: int, width: int = 1536, depth: int = 6,
                 num_timesteps: int = 1000, schedule: str = "cosine", learn_sigma: bool = True,
                 precision: str = "auto", chunk_rows: int = 0):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if chunk_rows < 0:
            raise ValueError(f"chunk_rows must be >= 0, got {chunk_rows}")
        self.precision, self.chunk_rows = precision, int(chunk_rows)
        self.target_channels, self.z_channels = target_channels, z_channels
        self.learn_sigma = bool(learn_sigma)
        out_channels = 2 * target_channels if learn_sigma else target_channels
        self.net = SimpleMLP(in_channels=target_channels, width=width, out_channels=out_channels,
                             z_channels=z_channels, depth=depth)
        self.diffusion = GaussianDiffusion(num_timesteps=num_timesteps, schedule=schedule, learn_sigma=learn_sigma)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, target_channels: int, z_channels: int) -> "DiffusionLoss":
        return cls(target_channels, z_channels, width=cfg.width, depth=cfg.depth, num_timesteps=cfg.num_timesteps,
                   schedule=cfg.schedule, learn_sigma=cfg.learn_sigma, precision=cfg.precision,
                   chunk_rows=cfg.chunk_rows)

    def _compute(self, *tensors: torch.Tensor):
        """(context, tensors): fp32 tensors and autocast off when precision is "fp32"."""
        if self.precision != "fp32":
            return contextlib.nullcontext(), tensors
        return autocast_off(tensors[0].device), tuple(t.float() for t in tensors)

    def forward(self, z: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                seeds: torch.Tensor) -> Dict[str, torch.Tensor]:
        if z.dim() != 2 or target.dim() != 2 or z.shape[0] != target.shape[0]:
            raise ValueError(f"expected z (M, {self.z_channels}) and target (M, {self.target_channels}); "
                             f"got {tuple(z.shape)}, {tuple(target.shape)}")
        chunked = self.chunk_rows > 0 and torch.is_grad_enabled() and z.requires_grad and not target.requires_grad
        params = [p for p in self.parameters() if p.requires_grad] if chunked else []
        if params:
            # inside a chunk the VB term is plain autograd: its saves die with the chunk
            fn = functools.partial(self._rows_loss, recompute_vb=False)
            out = chunked_row_loss(fn, z, target, t, seeds, params, self.chunk_rows)
            if not self.learn_sigma:
                del out["vb"]
            return out
        return self._rows_loss(z, target, t, seeds)

    def _rows_loss(self, z, target, t, seeds, recompute_vb: bool = True) -> Dict[str, torch.Tensor]:
        d = self.diffusion
        context, (z, target) = self._compute(z, target)
        with context:
            x_t = q_sample(target, t, seeds, d.table("sqrt_alphas_cumprod", target.device),
                           d.table("sqrt_one_minus_alphas_cumprod", target.device))
            model_output = self.net(x_t, t, z)
            c = target.shape[1]
            out = {"mse": eps_mse(model_output[:, :c], seeds).mean()}
            if self.learn_sigma:
                vb = functools.partial(_vb_terms, d, c)
                if recompute_vb:  # with lean saves: keeps only its inputs for backward
                    out["vb"] = lean.recompute_rows(vb, model_output, target, x_t, t).mean()
                else:
                    out["vb"] = vb(model_output, target, x_t, t).mean()
                out["loss"] = out["mse"] + out["vb"]
            else:
                out["loss"] = out["mse"]
        return out
