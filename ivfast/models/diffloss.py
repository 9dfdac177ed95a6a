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

The head computes in the dtype of its parameters / inputs (no autocast handling here).
Sampling of (t, eps) and the loss given them are separate methods so tests and fused
kernels can swap either piece.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ivfast.models.diffusion import GaussianDiffusion


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


class TimestepEmbedder(nn.Module):
    """timestep_embedding(t, freq_dim) -> Linear(freq_dim, w) -> SiLU -> Linear(w, w)."""

    def __init__(self, width: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, width),
            nn.SiLU(),
            nn.Linear(width, width),
        )

    fused = False  # set by SimpleMLP(fused=True): the embedding from kernels.sincos

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from kernels.sincos import timestep_embedding as embed
        else:
            embed = timestep_embedding
        emb = embed(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class AdaLNBlock(nn.Module):
    """Residual MLP block modulated by the conditioning y (shift, scale, gate)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=True)
        self.mlp = nn.Sequential(
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, width),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        h = self.mlp(modulate(self.norm(x), shift, scale))
        return x + gate * h


class FinalLayer(nn.Module):
    """Affine-free LayerNorm, adaLN (shift, scale) from y, then Linear(w, out_channels)."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_channels)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLP(nn.Module):
    """Denoiser: (x_t (M, in), t (M,), z (M, z_channels)) -> (M, out_channels).

    ``fused=True`` runs the blocks and the final layer through ``kernels.adaln`` (same
    parameters and math; SiLU(y) computed once and shared by every adaLN projection).
    """

    def __init__(self, in_channels: int, width: int, out_channels: int,
                 z_channels: int, depth: int, fused: bool = False):
        super().__init__()
        self.fused = bool(fused)
        self.in_channels = in_channels
        self.width = width
        self.out_channels = out_channels
        self.z_channels = z_channels
        self.depth = depth
        self.time_embed = TimestepEmbedder(width)
        self.time_embed.fused = self.fused
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
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
        y = self.time_embed(t) + self.cond_embed(z)
        h = self.input_proj(x_t)
        if self.fused:
            from kernels.adaln import fused_block_forward, fused_final_forward

            silu_y = F.silu(y)
            for block in self.res_blocks:
                h = fused_block_forward(block, h, silu_y)
            return fused_final_forward(self.final_layer, h, silu_y)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)


class DiffusionLoss(nn.Module):
    """Diffusion reconstruction loss of target tokens (M, C) conditioned on z (M, z_channels).

    Each row (repeated ``batch_mul`` times) gets its own t ~ U{0..T-1} and eps ~ N(0, I).
    ``forward`` returns {"loss", "mse"} (+ "vb" with ``learn_sigma``), each a scalar mean.
    """

    def __init__(self, target_channels: int, z_channels: int, width: int = 1536,
                 depth: int = 6, num_timesteps: int = 1000, schedule: str = "cosine",
                 learn_sigma: bool = True, batch_mul: int = 1, fused: bool = False):
        super().__init__()
        if batch_mul < 1:
            raise ValueError(f"batch_mul must be >= 1, got {batch_mul}")
        self.target_channels = target_channels
        self.z_channels = z_channels
        self.learn_sigma = bool(learn_sigma)
        self.batch_mul = int(batch_mul)
        out_channels = 2 * target_channels if learn_sigma else target_channels
        self.net = SimpleMLP(in_channels=target_channels, width=width,
                             out_channels=out_channels, z_channels=z_channels, depth=depth,
                             fused=fused)
        self.diffusion = GaussianDiffusion(num_timesteps=num_timesteps, schedule=schedule,
                                           learn_sigma=learn_sigma)

    @property
    def num_timesteps(self) -> int:
        return self.diffusion.num_timesteps

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
        eps, so a run gives the same losses with kernels on or off.
        """
        from kernels.diffusion_noise import eps_mse_fused, q_sample_fused

        d = self.diffusion
        x_t = q_sample_fused(target, t, seeds, d.sqrt_alphas_cumprod.to(target.device),
                             d.sqrt_one_minus_alphas_cumprod.to(target.device))
        model_output = self.net(x_t, t, z)
        c = target.shape[1]
        mse = eps_mse_fused(model_output[:, :c], seeds)
        out = {"mse": mse.mean()}
        if self.learn_sigma:
            frozen = torch.cat([model_output[:, :c].detach(), model_output[:, c:]], dim=1)
            out["vb"] = d.vb_terms_bpd(frozen, target, x_t, t).mean()
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
        if self.batch_mul > 1:
            z = z.repeat(self.batch_mul, 1)
            target = target.repeat(self.batch_mul, 1)
        t, noise = self.sample_t_noise(target, generator)
        return self.loss_given(z, target, t, noise)
