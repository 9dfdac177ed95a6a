"""Per-token diffusion reconstruction head (Stage 1, "Diffusion recon").

A small denoiser ``SimpleMLP`` predicts the noise added to a target token x (e.g. a
3x14x14 pixel patch, 588 channels) given the noised token x_t, the timestep t and a
conditioning vector z from the predictor. ``DiffusionLoss`` draws (t, eps) per row,
noises the target with ``GaussianDiffusion.q_sample`` and returns the mean training losses.

Denoiser layout:
    y = TimestepEmbedder(t) + Linear(z)
    h = Linear(x_t)
    repeat depth: shift, scale, gate = Linear(SiLU(y)).chunk(3)
                  h = h + gate * MLP(LN(h) * (1 + scale) + shift)
    shift, scale = Linear(SiLU(y)).chunk(2);  out = Linear(LN(h) * (1 + scale) + shift)
All adaLN projections and the output projection start at zero, so the initial output is 0.

The head computes in the dtype of its inputs: its Linear and LayerNorm layers cast their
parameters to it on use, a no-op when they agree (``precision="auto"``: the training dtype,
the fused kernels). ``DiffusionLoss(precision="fp32")`` upcasts its inputs and turns autocast
off, so a head whose parameters DeepSpeed keeps in bf16 still computes in fp32 (as the
release's does); the gradients reach the bf16 parameters through the casts.
Sampling of (t, eps) and the loss given them are separate methods so tests and fused
kernels can swap either piece. ``checkpointing`` recomputes each residual block in backward.
``chunk_rows`` > 0 runs ``loss_given_seeds`` and its backward a chunk of rows at a time in the
forward, keeping only the gradients (:mod:`ivfast.models.chunked_loss`).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ivfast.models import lean_mlp
from ivfast.models.checkpointing import run_block
from ivfast.models.chunked_loss import chunked_row_loss
from ivfast.models.diffusion import GaussianDiffusion

PRECISIONS = ("auto", "fp32")


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (M,) -> (M, dim) float32.

    freqs_i = exp(-ln(max_period) * i / (dim // 2)), i < dim // 2;
    output = [cos(t * freqs) | sin(t * freqs)], plus one zero column when ``dim`` is odd.
    """
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(i * (-math.log(max_period) / half))
    args = t.reshape(-1).to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)
    return emb


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift."""
    return x * (1.0 + scale) + shift


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
        self.mlp = nn.Sequential(
            CastLinear(frequency_embedding_size, width),
            nn.SiLU(),
            CastLinear(width, width),
        )

    fused = False  # set by SimpleMLP(fused=True): the embedding from kernels.sincos

    def forward(self, t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """(M,) -> (M, width) in ``dtype`` (default: the parameters' dtype)."""
        if self.fused:
            from kernels.sincos import timestep_embedding as embed
        else:
            embed = timestep_embedding
        emb = embed(t, self.frequency_embedding_size)
        return self.mlp(emb.to(dtype or self.mlp[0].weight.dtype))


class AdaLNBlock(nn.Module):
    """Residual MLP block modulated by the conditioning y (shift, scale, gate).

    Given ``silu_y`` = SiLU(y) (``SimpleMLP(fused=True)``) and parameters in x's dtype, the
    block runs through ``kernels.adaln``; else the layers below (in x's dtype).
    """

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.norm = CastLayerNorm(width, eps=1e-6, elementwise_affine=True)
        self.mlp = nn.Sequential(
            CastLinear(width, width),
            nn.SiLU(),
            CastLinear(width, width),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), CastLinear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor, silu_y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if silu_y is not None and self.norm.weight.dtype == x.dtype:
            from kernels.adaln import fused_block_forward

            return fused_block_forward(self, x, silu_y)
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        h = self.mlp(modulate(self.norm(x), shift, scale))
        return x + gate * h


class FinalLayer(nn.Module):
    """Affine-free LayerNorm, adaLN (shift, scale) from y, then Linear(w, out_channels).

    ``silu_y``: as for :class:`AdaLNBlock` (``kernels.adaln`` when the dtypes agree)."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = CastLayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), CastLinear(width, 2 * width))
        self.linear = CastLinear(width, out_channels)

    def forward(self, x: torch.Tensor, y: torch.Tensor, silu_y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if silu_y is not None and self.linear.weight.dtype == x.dtype:
            from kernels.adaln import fused_final_forward

            return fused_final_forward(self, x, silu_y)
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLP(nn.Module):
    """Denoiser: (x_t (M, in), t (M,), z (M, z_channels)) -> (M, out_channels).

    ``fused=True`` runs the blocks and the final layer through ``kernels.adaln`` (same
    parameters and math; SiLU(y) computed once and shared by every adaLN projection).
    Computes in x_t's dtype. ``checkpointing``: recompute each residual block in backward.
    """

    def __init__(self, in_channels: int, width: int, out_channels: int,
                 z_channels: int, depth: int, fused: bool = False, checkpointing: bool = False):
        super().__init__()
        self.fused = bool(fused)
        self.checkpointing = bool(checkpointing)
        self.in_channels = in_channels
        self.width = width
        self.out_channels = out_channels
        self.z_channels = z_channels
        self.depth = depth
        self.time_embed = TimestepEmbedder(width)
        self.time_embed.fused = self.fused
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
        y = self.time_embed(t, x_t.dtype) + self.cond_embed(z)
        h = self.input_proj(x_t)
        silu_y = F.silu(y) if self.fused else None
        for block in self.res_blocks:
            h = run_block(block, h, y, silu_y, checkpoint=self.checkpointing)
        return self.final_layer(h, y, silu_y)


def _vb_terms(diffusion, c: int, model_output, target, x_t, t):
    """The variational-bound term per row, its gradient only through the variance half."""
    frozen = torch.cat([model_output[:, :c].detach(), model_output[:, c:]], dim=1)
    return diffusion.vb_terms_bpd(frozen, target, x_t, t)


class DiffusionLoss(nn.Module):
    """Diffusion reconstruction loss of target tokens (M, C) conditioned on z (M, z_channels).

    Each row (repeated ``batch_mul`` times) gets its own t ~ U{0..T-1} and eps ~ N(0, I).
    ``forward`` returns {"loss", "mse"} (+ "vb" with ``learn_sigma``), each a scalar mean.
    ``precision``: "auto" computes in the inputs' dtype; "fp32" upcasts the inputs and turns
    autocast off (the fused kernels then run only when the parameters are fp32 too).
    ``lean`` (``model.lean_mlp``): the variational-bound term of ``loss_given_seeds`` keeps only
    its inputs for backward and is recomputed there (elementwise; same values).
    ``chunk_rows`` (``model.diffusion.chunk_rows``) > 0: ``loss_given_seeds`` computes the loss
    and its gradients ``chunk_rows`` rows at a time during the forward and keeps only the
    gradients for backward (:mod:`ivfast.models.chunked_loss`); 0: plain autograd.
    """

    lean = False
    chunk_rows = 0

    def __init__(self, target_channels: int, z_channels: int, width: int = 1536,
                 depth: int = 6, num_timesteps: int = 1000, schedule: str = "cosine",
                 learn_sigma: bool = True, batch_mul: int = 1, fused: bool = False,
                 precision: str = "auto", checkpointing: bool = False):
        super().__init__()
        if batch_mul < 1:
            raise ValueError(f"batch_mul must be >= 1, got {batch_mul}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.target_channels = target_channels
        self.z_channels = z_channels
        self.learn_sigma = bool(learn_sigma)
        self.batch_mul = int(batch_mul)
        out_channels = 2 * target_channels if learn_sigma else target_channels
        self.net = SimpleMLP(in_channels=target_channels, width=width,
                             out_channels=out_channels, z_channels=z_channels, depth=depth,
                             fused=fused, checkpointing=checkpointing)
        self.diffusion = GaussianDiffusion(num_timesteps=num_timesteps, schedule=schedule,
                                           learn_sigma=learn_sigma)

    @property
    def num_timesteps(self) -> int:
        return self.diffusion.num_timesteps

    def _compute(self, *tensors: torch.Tensor):
        """(context, tensors) for the head: fp32 tensors and autocast off when precision is "fp32"."""
        if self.precision != "fp32":
            return contextlib.nullcontext(), tensors
        return torch.autocast(tensors[0].device.type, enabled=False), tuple(t.float() for t in tensors)

    def sample_t_noise(self, target: torch.Tensor,
                       generator: Optional[torch.Generator] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """t (M,) int64 uniform in [0, T) and noise ~ N(0, 1) shaped like ``target``.

        Drawn t first, then noise; with a generator they are drawn on its device and moved to
        ``target``'s device.
        """
        device = generator.device if generator is not None else target.device
        t = torch.randint(0, self.num_timesteps, (target.shape[0],), generator=generator,
                          device=device, dtype=torch.long)
        noise = torch.randn(target.shape, generator=generator, device=device,
                            dtype=target.dtype)
        return t.to(target.device), noise.to(target.device)

    def loss_given(self, z: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Mean losses for already-repeated rows and a given (t, noise)."""
        context, (z, target, noise) = self._compute(z, target, noise)
        with context:
            x_t = self.diffusion.q_sample(target, t, noise)
            model_output = self.net(x_t, t, z)
            losses = self.diffusion.training_losses(model_output, target, x_t, t, noise)
            out = {"loss": losses["loss"].mean(), "mse": losses["mse"].mean()}
            if "vb" in losses:
                out["vb"] = losses["vb"].mean()
        return out

    def loss_given_seeds(self, z: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                         seeds: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Mean losses with eps drawn from Philox(seeds[r], c) and never stored.

        ``seeds`` (M,) int64, one stream per row (``kernels.diffusion_noise.row_seeds``). The
        fused kernels (CUDA, or the interpreter) and their PyTorch references draw the same
        eps, so a run gives the same losses with kernels on or off. With ``chunk_rows`` > 0, under
        autograd and for a z that needs a gradient, the rows run in chunks whose backward runs
        here too (:func:`ivfast.models.chunked_loss.chunked_row_loss`; the same values).
        """
        chunked = self.chunk_rows > 0 and torch.is_grad_enabled() and z.requires_grad and not target.requires_grad
        params = [p for p in self.parameters() if p.requires_grad] if chunked else []
        if params:
            # inside a chunk the VB term is not recomputed (lean=False): its saves die with the chunk
            fn = functools.partial(self._loss_given_seeds, lean=False)
            out = chunked_row_loss(fn, z, target, t, seeds, params, self.chunk_rows)
            if not self.learn_sigma:
                del out["vb"]
            return out
        return self._loss_given_seeds(z, target, t, seeds, lean=self.lean)

    def _loss_given_seeds(self, z, target, t, seeds, lean: bool) -> Dict[str, torch.Tensor]:
        from kernels.diffusion_noise import eps_mse_fused, q_sample_fused

        d = self.diffusion
        context, (z, target) = self._compute(z, target)
        with context:
            x_t = q_sample_fused(target, t, seeds, d.sqrt_alphas_cumprod.to(target.device),
                                 d.sqrt_one_minus_alphas_cumprod.to(target.device))
            model_output = self.net(x_t, t, z)
            c = target.shape[1]
            mse = eps_mse_fused(model_output[:, :c], seeds)
            out = {"mse": mse.mean()}
            if self.learn_sigma:
                vb = functools.partial(_vb_terms, d, c)
                if lean and torch.is_grad_enabled():  # keeps only its inputs for backward
                    vb = functools.partial(lean_mlp.recompute_rows, vb)
                out["vb"] = vb(model_output, target, x_t, t).mean()
                out["loss"] = out["mse"] + out["vb"]
            else:
                out["loss"] = out["mse"]
        return out

    def forward(self, z: torch.Tensor, target: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        if z.dim() != 2 or target.dim() != 2 or z.shape[0] != target.shape[0]:
            raise ValueError(f"expected z (M, {self.z_channels}) and target "
                             f"(M, {self.target_channels}); got {tuple(z.shape)}, "
                             f"{tuple(target.shape)}")
        _, (z, target) = self._compute(z, target)  # fp32: the noise is drawn in fp32 too
        if self.batch_mul > 1:
            z = z.repeat(self.batch_mul, 1)
            target = target.repeat(self.batch_mul, 1)
        t, noise = self.sample_t_noise(target, generator)
        return self.loss_given(z, target, t, noise)
