"""Sinusoidal timestep embedding: ``[cos(t * f) | sin(t * f)]`` with
``f_i = exp(-ln(max_period) * i / (dim // 2))``, plus a zero column for odd ``dim``; float32.

The kernel takes the frequencies from torch (computed as the reference does: an in-kernel
``exp`` is an ulp off, which t up to 1000 turns into a visible difference) and computes the
angle and its sin/cos in float32: ~5e-7 * |t| from the reference. No backward: timesteps are
integers; a ``t`` that requires grad gets the reference.
"""
from __future__ import annotations

import math

import torch

from ivfast.ops import launch
from ivfast.ops.dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


# =========================================================================== reference
def _freqs(dim: int, max_period: float, device) -> torch.Tensor:
    half = dim // 2
    return torch.exp(torch.arange(half, dtype=torch.float32, device=device) * (-math.log(max_period) / max(half, 1)))


def timestep_embedding_ref(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(M,) (any shape, flattened) -> (M, dim) float32."""
    args = t.reshape(-1).to(torch.float32)[:, None] * _freqs(dim, max_period, t.device)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)
    return emb


# =========================================================================== kernel
if triton is not None:

    @triton.jit
    def _timestep_kernel(t_ptr, freq_ptr, out_ptr, M, DIM: tl.constexpr, HALF: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        rmask = rows < M
        t = tl.load(t_ptr + rows, mask=rmask, other=0).to(tl.float32)
        is_cos = cols < HALF
        i = tl.where(is_cos, cols, cols - HALF)
        freq = tl.load(freq_ptr + i, mask=(cols < 2 * HALF) & (i < HALF), other=0.0)
        ang = t[:, None] * freq[None, :]
        val = tl.where(is_cos[None, :], tl.cos(ang), tl.sin(ang))
        val = tl.where((cols < 2 * HALF)[None, :], val, 0.0)
        offs = rows[:, None].to(tl.int64) * DIM + cols[None, :]
        tl.store(out_ptr + offs, val, mask=rmask[:, None] & (cols < DIM)[None, :])


# =========================================================================== launcher
def timestep_config(m: int, dim: int, target: launch.Target) -> launch.Launch:
    """(m, dim) float32 output (the dtype is always float32): row x column tiles."""
    bm, bd = launch.row_tile(m, dim, gpu=target.gpu)
    return launch.Launch.of((launch.cdiv(m, bm), launch.cdiv(dim, bd)), launch.num_warps_for(bm * bd),
                            DIM=dim, HALF=dim // 2, BLOCK_M=bm, BLOCK_D=bd)


# =========================================================================== API
def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(M, dim) float32 embedding of timesteps ``t`` (any shape, flattened)."""
    if dim <= 0:
        raise ValueError(f"timestep_embedding needs dim >= 1, got {dim}")
    flat = t.reshape(-1)
    if (triton is None or flat.requires_grad or flat.dtype == torch.bool or flat.is_complex()
            or not use_triton(flat)):
        return timestep_embedding_ref(t, dim, max_period)
    flat = flat.contiguous()
    m = flat.shape[0]
    out = torch.empty(m, dim, device=flat.device, dtype=torch.float32)
    if m == 0:
        return out
    half = dim // 2
    freqs = _freqs(dim, max_period, flat.device) if half else torch.zeros(1, device=flat.device)  # never read at dim 1
    plan = timestep_config(m, dim, launch.target(flat.device))
    launch.run("timestep_embedding", _timestep_kernel, plan, flat, freqs, out, m)
    return out
