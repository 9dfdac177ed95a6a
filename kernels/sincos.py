"""Sine-cosine embeddings computed by Triton kernels (no table read).

Public functions (each dispatches with ``kernels.dispatch.use_triton``; the references are
``ivfast.models.pos_embed.sincos_3d`` and ``ivfast.models.diffloss.timestep_embedding``):

- ``sincos_3d(dim, t, h, w, device, dtype=torch.float32) -> (t*h*w, dim)``: the fixed 3-D
  position table, row ``ti*h*w + y*w + x``, channels ``[temporal dim/4 | x 3dim/8 | y 3dim/8]``,
  each 1-D block ``[sin(p * omega) | cos(p * omega)]`` with ``omega_i = 10000 ** (-i / half)``.
- ``timestep_embedding(t, dim=256, max_period=10000) -> (M, dim)`` float32:
  ``[cos(t * f) | sin(t * f)]`` with ``f_i = exp(-ln(max_period) * i / (dim // 2))`` (plus a
  zero column for odd ``dim``).

``sincos3d_at`` is the one in-kernel formula of the 3-D table; ``kernels.token_gather``
imports it to add fixed positions without reading a table.

Numerics (fp32 throughout): the reference table is computed in float64 and rounded to
float32; the kernel computes ``omega = exp2(i * (-log2(10000) / half))`` and the angle in
float32, so its error grows with the position p: about ``4e-7 * p`` absolute (plus the
sin/cos rounding, ~1e-7), i.e. < 2e-5 for 32 frames. On CUDA ``exp``/``exp2`` lower to the
hardware approximation (about 2 ulp), which is covered by the same bound. The timestep
embedding follows the reference's float32 recipe step by step; the remaining difference is
the ulp-level ``exp`` and the rounding of ``t * f`` amplified by ``t`` (up to ~5e-7 * |t|).

Neither function has a backward: the table is a constant, and timesteps are integer (or
non-differentiable) inputs. A ``t`` that requires grad is served by the reference so that
autograd stays correct. The outputs are ordinary tensors usable in autograd graphs.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.dispatch import interpreting, use_triton

_LOG2_10000 = tl.constexpr(math.log2(10000.0))


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def row_tile(rows: int, width: int, *, max_tile: int = 2048, max_rows: int = 64) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_D) for a row-wise elementwise kernel over a (rows, width) tensor.

    On a GPU: BLOCK_D is the power of two in [128, 1024] wasting the fewest masked lanes
    (768 -> 256, 1536 -> 512, 1024 -> 1024, 588 -> 128), rows fill a ~``max_tile``-element
    tile; with ``num_warps_for`` that is ~8 elements per thread (compiled for sm_90 these
    kernels then stay at 34-72 registers without spills). Under the interpreter (each
    program costs ~1-2 ms) one block spans the whole width and as many rows as fit in 64K
    elements, so small tests run in a few programs.
    """
    if interpreting():
        bd = next_pow2(width)
        bm = max(1, min(next_pow2(rows), max(1, 65536 // bd), 256))
        return bm, bd
    best = None
    for bd in (1024, 512, 256, 128):
        waste = triton.cdiv(width, bd) * bd / width
        if best is None or waste < best[0] - 1e-9:
            best = (waste, bd)
    bd = min(best[1], next_pow2(width))
    bm = max(1, min(max_rows, max_tile // bd, next_pow2(rows)))
    return bm, bd


def num_warps_for(tile: int) -> int:
    """About 8 elements per thread, 1 to 8 warps."""
    return max(1, min(8, tile // 256))


# --------------------------------------------------------------------------- shared formula
@triton.jit
def sincos3d_at(tok, col, H, W, DIM: tl.constexpr):
    """fp32 value of ``pos_embed.sincos_3d(DIM, T, H, W)[tok, col]``.

    ``tok``: integer token indices ``ti*H*W + y*W + x`` (e.g. shape (BM, 1)); ``col``: integer
    channels (e.g. shape (1, BD)); broadcast to the result's shape. Channels >= DIM give
    garbage (mask them on store). ``DIM % 16 == 0`` (checked by the callers).
    """
    DT: tl.constexpr = DIM // 4  # temporal block width
    HALF_T: tl.constexpr = DT // 2
    HS: tl.constexpr = (DIM - DT) // 2  # width of the x block and of the y block
    HALF_S: tl.constexpr = HS // 2
    tok = tok.to(tl.int32)
    col = col.to(tl.int32)
    hw = H * W
    ti = tok // hw
    rem = tok - ti * hw
    yy = rem // W
    xx = rem - yy * W
    is_t = col < DT
    is_x = (col >= DT) & (col < DT + HS)
    local = tl.where(is_t, col, tl.where(is_x, col - DT, col - DT - HS))
    half = tl.where(is_t, HALF_T, HALF_S)
    is_sin = local < half
    i = tl.where(is_sin, local, local - half).to(tl.float32)
    scale = tl.where(is_t, -_LOG2_10000 / HALF_T, -_LOG2_10000 / HALF_S)
    omega = tl.exp2(i * scale)
    p = tl.where(is_t, ti, tl.where(is_x, xx, yy)).to(tl.float32)
    ang = p * omega
    return tl.where(is_sin, tl.sin(ang), tl.cos(ang))


@triton.jit
def _sincos3d_table_kernel(out_ptr, R, H, W, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < R) & (cols[None, :] < DIM)
    val = sincos3d_at(rows[:, None], cols[None, :], H, W, DIM)
    offs = rows[:, None].to(tl.int64) * DIM + cols[None, :]
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _timestep_kernel(t_ptr, freq_ptr, out_ptr, M, DIM: tl.constexpr, HALF: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < M
    t = tl.load(t_ptr + rows, mask=rmask, other=0).to(tl.float32)
    is_cos = cols < HALF
    i = tl.where(is_cos, cols, cols - HALF)
    # The frequencies come from torch (as the reference computes them): an in-kernel exp is
    # an ulp off, which t (up to 1000) turns into a visible difference in the embedding.
    freq = tl.load(freq_ptr + i, mask=(cols < 2 * HALF) & (i < HALF), other=0.0)
    ang = t[:, None] * freq[None, :]
    val = tl.where(is_cos[None, :], tl.cos(ang), tl.sin(ang))
    val = tl.where((cols < 2 * HALF)[None, :], val, 0.0)
    offs = rows[:, None].to(tl.int64) * DIM + cols[None, :]
    tl.store(out_ptr + offs, val, mask=rmask[:, None] & (cols < DIM)[None, :])


# --------------------------------------------------------------------------- references
def sincos_3d_reference(dim: int, t: int, h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    from ivfast.models.pos_embed import sincos_3d as ref

    return ref(dim, t, h, w).to(device=device, dtype=dtype)


def timestep_embedding_reference(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    from ivfast.models.diffloss import timestep_embedding as ref

    return ref(t, dim, max_period)


# --------------------------------------------------------------------------- public API
def check_sincos_dim(dim: int) -> None:
    if dim <= 0 or dim % 16:
        raise ValueError(f"3-D sincos needs dim divisible by 16, got {dim}")


def sincos_3d(dim: int, t: int, h: int, w: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(t*h*w, dim) fixed 3-D sine-cosine table in ``dtype`` on ``device``, computed by a kernel."""
    check_sincos_dim(dim)
    device = torch.device(device if device is not None else "cpu")
    rows = t * h * w
    out = torch.empty(rows, dim, device=device, dtype=dtype)
    if rows == 0 or not use_triton(out):
        return sincos_3d_reference(dim, t, h, w, device, dtype)
    bm, bd = row_tile(rows, dim)
    grid = (triton.cdiv(rows, bm), triton.cdiv(dim, bd))
    _sincos3d_table_kernel[grid](out, rows, h, w, DIM=dim, BLOCK_M=bm, BLOCK_D=bd, num_warps=num_warps_for(bm * bd))
    return out


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(M, dim) float32 sinusoidal embedding of timesteps ``t`` (any shape, flattened)."""
    if dim <= 0:
        raise ValueError(f"timestep_embedding needs dim >= 1, got {dim}")
    flat = t.reshape(-1)
    if flat.requires_grad or flat.dtype == torch.bool or flat.is_complex() or not use_triton(flat):
        return timestep_embedding_reference(t, dim, max_period)
    flat = flat.contiguous()
    m = flat.shape[0]
    out = torch.empty(m, dim, device=flat.device, dtype=torch.float32)
    if m == 0:
        return out
    half = dim // 2
    freqs = torch.exp(torch.arange(max(half, 1), dtype=torch.float32, device=flat.device)
                      * (-math.log(max_period) / max(half, 1)))
    bm, bd = row_tile(m, dim)
    grid = (triton.cdiv(m, bm), triton.cdiv(dim, bd))
    _timestep_kernel[grid](flat, freqs, out, m, DIM=dim, HALF=half, BLOCK_M=bm, BLOCK_D=bd,
                           num_warps=num_warps_for(bm * bd))
    return out
