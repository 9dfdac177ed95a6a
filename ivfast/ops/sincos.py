"""Fixed sine-cosine position tables (the reference) and their in-kernel formula.

3-D table, row ``ti*h*w + y*w + x`` (t-major, then rows, then columns: the encoder's token
order), channels ``[temporal dim/4 | x 3dim/8 | y 3dim/8]``, each 1-D block
``[sin(p * omega) | cos(p * omega)]`` with ``omega_i = 10000 ** (-i / half)``. The tables are
computed in float64 and returned as float32 (torch ops only, so they work on ``meta`` too).

:func:`sincos3d_at` computes one entry inside a kernel in float32 (``omega`` by ``exp2``), so
its error grows with the position: about ``4e-7 * p`` absolute plus the sin/cos rounding, under
2e-5 for 32 frames; the token-gather kernels add positions with it without reading a table.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

Positions = Union[torch.Tensor, Sequence[float], int]


# =========================================================================== reference
def _positions(positions: Positions) -> torch.Tensor:
    if isinstance(positions, int):
        return torch.arange(positions, dtype=torch.float64)
    return torch.as_tensor(positions, dtype=torch.float64).reshape(-1)


def sincos_1d(dim: int, positions: Positions) -> torch.Tensor:
    """(len(positions), dim) float32 ``[sin(p * omega) | cos(p * omega)]``; ``positions`` a 1-D
    tensor or sequence (fractions allowed) or an int n meaning range(n); ``dim`` even."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"sincos_1d needs a positive even dim, got {dim}")
    pos = _positions(positions)
    half = dim // 2
    omega = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float64, device=pos.device) / half)
    angles = pos[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """(h*w, dim), row ``y*w + x``: ``[sincos_1d(dim/2, x) | sincos_1d(dim/2, y)]``; dim % 4 == 0."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4 (two even halves), got {dim}")
    half = dim // 2
    ex, ey = sincos_1d(half, w), sincos_1d(half, h)
    return torch.cat([ex[None, :, :].expand(h, w, half), ey[:, None, :].expand(h, w, half)], dim=-1).reshape(h * w, dim)


def check_sincos_dim(dim: int) -> None:
    """The 3-D table needs dim % 16 == 0: an even temporal block (dim/4) and even spatial halves (3dim/8)."""
    if dim <= 0 or dim % 16:
        raise ValueError(f"3-D sincos needs dim divisible by 16 (temporal dim/4 and both spatial halves "
                         f"3*dim/8 must be even), got {dim}")


def sincos_3d(dim: int, t: int, h: int, w: int) -> torch.Tensor:
    """(t*h*w, dim) float32: ``[sincos_1d(dim/4, ti) | sincos_2d(3dim/4, h, w)]`` per row."""
    check_sincos_dim(dim)
    dt = dim // 4
    ds = dim - dt
    et, es = sincos_1d(dt, t), sincos_2d(ds, h, w)
    n_s = h * w
    return torch.cat([et[:, None, :].expand(t, n_s, dt), es[None, :, :].expand(t, n_s, ds)], dim=-1).reshape(t * n_s, dim)


# =========================================================================== in-kernel formula
if triton is not None:
    _LOG2_10000 = tl.constexpr(math.log2(10000.0))

    @triton.jit
    def sincos3d_at(tok, col, H, W, DIM: tl.constexpr):
        """float32 ``sincos_3d(DIM, T, H, W)[tok, col]``, broadcast over ``tok`` (e.g. (BM, 1)) and
        ``col`` (e.g. (1, BD)). Channels >= DIM give garbage (mask them on store)."""
        DT: tl.constexpr = DIM // 4
        HALF_T: tl.constexpr = DT // 2
        HS: tl.constexpr = (DIM - DT) // 2
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
