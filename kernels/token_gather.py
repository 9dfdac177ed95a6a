"""Masked-token gather with the position add, and its inverse with the mask token, fused.

Public functions (each dispatches with ``kernels.dispatch.use_triton`` to a Triton kernel
wrapped in a ``torch.autograd.Function``, else to the plain PyTorch reference beside it):

- ``add_pos_and_gather(x, idx, pos=None, grid=None) -> (B, M, D)``:
  ``out[b, m] = x[b, idx[b, m]] + P[idx[b, m]]`` with ``P`` the learnable table ``pos``
  (N, D), or, when ``pos`` is None, the fixed 3-D sine-cosine of ``grid = (t, h, w)``
  computed in the kernel from the token index (``kernels.sincos.sincos3d_at``; no table).
- ``scatter_with_mask_token(visible, idx, mask_token, pos=None, grid=None) -> (B, N, D)``:
  ``visible`` rows at ``idx``, ``mask_token`` (D,) elsewhere, plus ``P``, in one kernel.

Shapes: x (B, N, D), idx (B, M) integer, sorted ascending and unique within each row (the
visible indices of a mask), visible (B, M, D), pos (N, D) with N = t*h*w for the fixed table
(``D % 16 == 0`` then). Exactly one of ``pos`` / ``grid`` is given.

Numerics: every value is computed in float32 (token + position added in fp32) and rounded
once to the output dtype, which is the token dtype (``x.dtype`` / ``visible.dtype``; note
that ``token_ops.add_pos_and_gather`` itself type-promotes, e.g. bf16 tokens + fp32 table ->
fp32, so the references here cast back to the token dtype).

Backward (no atomics; deterministic):

- gather: one kernel over blocks of token positions n loops over the batch in a fixed
  order; for each b it reads the inverse index ``inv[b, n]`` ((B, N) int32, -1 for masked
  positions; built with one ``scatter_`` of an arange) and writes ``grad_x[b, n]`` (the
  upstream row or zeros: every element of grad_x written exactly once, no other (B, N, D)
  buffer) while summing the same rows into ``grad_pos[n]`` in fp32.
- scatter: the same loop over the batch reads ``grad_out[b, n]`` once, writes it to
  ``grad_visible[b, inv[b, n]]`` when visible, sums it into ``grad_pos[n]`` (fp32) and,
  when masked, into a per-program fp32 partial of ``grad_mask_token``; the partials
  ((#programs, D)) are summed by torch afterwards (a deterministic two-pass reduction).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from kernels.dispatch import use_triton
from kernels.sincos import check_sincos_dim, num_warps_for, row_tile, sincos3d_at, sincos_3d_reference

POS_NONE, POS_TABLE, POS_SINCOS = 0, 1, 2


# --------------------------------------------------------------------------- kernels
@triton.jit
def _gather_fwd_kernel(
    x_ptr, idx_ptr, pos_ptr, out_ptr,
    R, M, D, H, W,
    sxb, sxn, sxd, sib, sim, spn, spd,
    POS_MODE: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[r] (r = b*M + m, contiguous (R, D)) = x[b, idx[b, m]] + P[idx[b, m]]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < R
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    b = (rows // M).to(tl.int64)
    m = (rows % M).to(tl.int64)
    n = tl.load(idx_ptr + b * sib + m * sim, mask=rmask, other=0).to(tl.int64)
    c64 = cols.to(tl.int64)
    val = tl.load(x_ptr + (b * sxb + n * sxn)[:, None] + (c64 * sxd)[None, :], mask=mask, other=0.0).to(tl.float32)
    if POS_MODE == 1:
        val += tl.load(pos_ptr + (n * spn)[:, None] + (c64 * spd)[None, :], mask=mask, other=0.0).to(tl.float32)
    if POS_MODE == 2:
        val += sincos3d_at(n[:, None], cols[None, :], H, W, DIM)
    offs = rows.to(tl.int64)[:, None] * D + c64[None, :]
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_bwd_kernel(
    g_ptr, inv_ptr, gx_ptr, gpos_ptr,
    B, N, D,
    sgb, sgm, sgd,
    WRITE_GX: tl.constexpr, WRITE_GPOS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """For a block of positions n: grad_x[b, n] = g[b, inv[b, n]] or 0; grad_pos[n] = sum_b of it."""
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    nmask = ns < N
    cmask = cols < D
    mask = nmask[:, None] & cmask[None, :]
    n64 = ns.to(tl.int64)
    c64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for b in range(B):
        b64 = tl.full((), b, tl.int64)
        j = tl.load(inv_ptr + b64 * N + n64, mask=nmask, other=-1).to(tl.int64)
        vis = j >= 0
        g = tl.load(g_ptr + (b64 * sgb + j * sgm)[:, None] + (c64 * sgd)[None, :],
                    mask=mask & vis[:, None], other=0.0).to(tl.float32)
        if WRITE_GX:
            tl.store(gx_ptr + (b64 * N + n64)[:, None] * D + c64[None, :], g.to(gx_ptr.dtype.element_ty), mask=mask)
        if WRITE_GPOS:
            acc += g
    if WRITE_GPOS:
        tl.store(gpos_ptr + n64[:, None] * D + c64[None, :], acc.to(gpos_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_fwd_kernel(
    vis_ptr, inv_ptr, mt_ptr, pos_ptr, out_ptr,
    R, N, D, H, W,
    svb, svm, svd, spn, spd,
    POS_MODE: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[r] (r = b*N + n) = (visible[b, inv[b, n]] if inv[b, n] >= 0 else mask_token) + P[n]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < R
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)
    c64 = cols.to(tl.int64)
    b = r64 // N
    n = r64 % N
    j = tl.load(inv_ptr + r64, mask=rmask, other=-1).to(tl.int64)
    vis = j >= 0
    v = tl.load(vis_ptr + (b * svb + j * svm)[:, None] + (c64 * svd)[None, :],
                mask=mask & vis[:, None], other=0.0).to(tl.float32)
    mt = tl.load(mt_ptr + c64, mask=cmask, other=0.0).to(tl.float32)
    val = tl.where(vis[:, None], v, mt[None, :])
    if POS_MODE == 1:
        val += tl.load(pos_ptr + (n * spn)[:, None] + (c64 * spd)[None, :], mask=mask, other=0.0).to(tl.float32)
    if POS_MODE == 2:
        val += sincos3d_at(n[:, None], cols[None, :], H, W, DIM)
    tl.store(out_ptr + r64[:, None] * D + c64[None, :], val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_bwd_kernel(
    g_ptr, inv_ptr, gvis_ptr, gpos_ptr, gmt_part_ptr,
    B, N, M, D,
    sgb, sgn, sgd,
    WRITE_GVIS: tl.constexpr, WRITE_GPOS: tl.constexpr, WRITE_GMT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """For a block of positions n, over the batch: grad_visible[b, inv] = g[b, n] (visible rows),
    grad_pos[n] = sum_b g[b, n], partial grad_mask_token = sum over masked (b, n) of g[b, n]."""
    pid_n = tl.program_id(0)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    nmask = ns < N
    cmask = cols < D
    mask = nmask[:, None] & cmask[None, :]
    n64 = ns.to(tl.int64)
    c64 = cols.to(tl.int64)
    acc_pos = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    acc_mt = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for b in range(B):
        b64 = tl.full((), b, tl.int64)
        j = tl.load(inv_ptr + b64 * N + n64, mask=nmask, other=-1).to(tl.int64)
        vis = j >= 0
        g = tl.load(g_ptr + (b64 * sgb + n64 * sgn)[:, None] + (c64 * sgd)[None, :], mask=mask, other=0.0).to(tl.float32)
        if WRITE_GVIS:
            tl.store(gvis_ptr + (b64 * M + j)[:, None] * D + c64[None, :], g.to(gvis_ptr.dtype.element_ty),
                     mask=mask & vis[:, None])
        if WRITE_GPOS:
            acc_pos += g
        if WRITE_GMT:
            acc_mt += tl.where(vis[:, None], 0.0, g)
    if WRITE_GPOS:
        tl.store(gpos_ptr + n64[:, None] * D + c64[None, :], acc_pos.to(gpos_ptr.dtype.element_ty), mask=mask)
    if WRITE_GMT:
        tl.store(gmt_part_ptr + pid_n.to(tl.int64) * D + c64, tl.sum(acc_mt, axis=0), mask=cmask)


# --------------------------------------------------------------------------- helpers
def _check(x: torch.Tensor, idx: torch.Tensor, n: int, pos: Optional[torch.Tensor], grid) -> Optional[tuple]:
    if (pos is None) == (grid is None):
        raise ValueError("give exactly one of pos (learnable (N, D) table) or grid ((t, h, w) fixed sincos)")
    if x.dim() != 3 or idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"expected tokens (B, *, D) and idx (B, M), got {tuple(x.shape)} and {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise TypeError(f"idx must be an integer tensor, got {idx.dtype}")
    d = x.shape[-1]
    if pos is not None:
        if pos.shape != (n, d):
            raise ValueError(f"pos must be (N, D) = {(n, d)}, got {tuple(pos.shape)}")
        return None
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or grid[0] * grid[1] * grid[2] != n:
        raise ValueError(f"grid {grid} must be (t, h, w) with t*h*w = N = {n}")
    check_sincos_dim(d)
    return grid


def inverse_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N) int32: inv[b, idx[b, m]] = m, -1 at positions not in idx (idx unique per row)."""
    b, m = idx.shape
    inv = torch.full((b, n), -1, dtype=torch.int32, device=idx.device)
    if m:
        inv.scatter_(1, idx.to(torch.int64), torch.arange(m, dtype=torch.int32, device=idx.device).expand(b, m))
    return inv


def _pos_args(pos: Optional[torch.Tensor], grid: Optional[tuple], like: torch.Tensor):
    if pos is not None:
        return POS_TABLE, pos, pos.stride(0), pos.stride(1), 1, 1
    return POS_SINCOS, like, 0, 0, grid[1], grid[2]


def _gather_forward(x, idx, pos, grid):
    bsz, _, d = x.shape
    m = idx.shape[1]
    out = torch.empty(bsz, m, d, device=x.device, dtype=x.dtype)
    r = bsz * m
    if r == 0 or d == 0:
        return out
    mode, pos_t, spn, spd, h, w = _pos_args(pos, grid, x)
    bm, bd = row_tile(r, d)
    launch = (triton.cdiv(r, bm), triton.cdiv(d, bd))
    _gather_fwd_kernel[launch](
        x, idx, pos_t, out, r, m, d, h, w,
        x.stride(0), x.stride(1), x.stride(2), idx.stride(0), idx.stride(1), spn, spd,
        POS_MODE=mode, DIM=d, BLOCK_M=bm, BLOCK_D=bd, num_warps=num_warps_for(bm * bd),
    )
    return out


def _scatter_forward(visible, inv, mask_token, pos, grid):
    bsz, _, d = visible.shape
    n = inv.shape[1]
    out = torch.empty(bsz, n, d, device=visible.device, dtype=visible.dtype)
    r = bsz * n
    if r == 0 or d == 0:
        return out
    mode, pos_t, spn, spd, h, w = _pos_args(pos, grid, visible)
    bm, bd = row_tile(r, d)
    launch = (triton.cdiv(r, bm), triton.cdiv(d, bd))
    _scatter_fwd_kernel[launch](
        visible, inv, mask_token, pos_t, out, r, n, d, h, w,
        visible.stride(0), visible.stride(1), visible.stride(2), spn, spd,
        POS_MODE=mode, DIM=d, BLOCK_M=bm, BLOCK_D=bd, num_warps=num_warps_for(bm * bd),
    )
    return out


def _bwd_tile(n: int, d: int) -> tuple[int, int]:
    # The backward kernels loop over the batch and hold one or two fp32 accumulator tiles.
    return row_tile(n, d, max_tile=2048, max_rows=32)


# --------------------------------------------------------------------------- autograd
class _AddPosGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, pos, grid):
        ctx.save_for_backward(idx)
        ctx.meta = (x.shape, x.dtype, None if pos is None else pos.dtype)
        return _gather_forward(x, idx, pos, grid)

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        (bsz, n, d), x_dtype, pos_dtype = ctx.meta
        want_x = ctx.needs_input_grad[0]
        want_pos = pos_dtype is not None and ctx.needs_input_grad[2]
        if not (want_x or want_pos):
            return None, None, None, None
        gx = torch.empty(bsz, n, d, device=g.device, dtype=x_dtype) if want_x else None
        gpos = torch.empty(n, d, device=g.device, dtype=pos_dtype) if want_pos else None
        if n and d:
            inv = inverse_index(idx, n)
            bn, bd = _bwd_tile(n, d)
            launch = (triton.cdiv(n, bn), triton.cdiv(d, bd))
            _gather_bwd_kernel[launch](
                g, inv, gx if want_x else g, gpos if want_pos else g, bsz, n, d,
                g.stride(0), g.stride(1), g.stride(2),
                WRITE_GX=want_x, WRITE_GPOS=want_pos, BLOCK_N=bn, BLOCK_D=bd, num_warps=num_warps_for(bn * bd),
            )
        return gx, None, gpos, None


class _ScatterMaskToken(torch.autograd.Function):
    @staticmethod
    def forward(ctx, visible, idx, mask_token, pos, grid, n):
        inv = inverse_index(idx, n)
        ctx.save_for_backward(inv)
        ctx.meta = (visible.shape, visible.dtype, mask_token.dtype, None if pos is None else pos.dtype)
        return _scatter_forward(visible, inv, mask_token, pos, grid)

    @staticmethod
    def backward(ctx, g):
        (inv,) = ctx.saved_tensors
        (bsz, m, d), vis_dtype, mt_dtype, pos_dtype = ctx.meta
        n = inv.shape[1]
        want_vis = ctx.needs_input_grad[0]
        want_mt = ctx.needs_input_grad[2]
        want_pos = pos_dtype is not None and ctx.needs_input_grad[3]
        if not (want_vis or want_mt or want_pos):
            return None, None, None, None, None, None
        gvis = torch.empty(bsz, m, d, device=g.device, dtype=vis_dtype) if want_vis else None
        gpos = torch.empty(n, d, device=g.device, dtype=pos_dtype) if want_pos else None
        gmt = None
        if n and d:
            bn, bd = _bwd_tile(n, d)
            launch = (triton.cdiv(n, bn), triton.cdiv(d, bd))
            part = torch.empty(launch[0], d, device=g.device, dtype=torch.float32) if want_mt else g
            _scatter_bwd_kernel[launch](
                g, inv, gvis if want_vis else g, gpos if want_pos else g, part, bsz, n, m, d,
                g.stride(0), g.stride(1), g.stride(2),
                WRITE_GVIS=want_vis, WRITE_GPOS=want_pos, WRITE_GMT=want_mt,
                BLOCK_N=bn, BLOCK_D=bd, num_warps=num_warps_for(bn * bd),
            )
            if want_mt:
                gmt = part.sum(0).to(mt_dtype)
        elif want_mt:
            gmt = torch.zeros(d, device=g.device, dtype=mt_dtype)
        return gvis, None, gmt, gpos, None, None


# --------------------------------------------------------------------------- references
def _table(pos: Optional[torch.Tensor], grid, d: int, device) -> torch.Tensor:
    return pos if pos is not None else sincos_3d_reference(d, *grid, device=device)


def add_pos_and_gather_reference(x, idx, pos=None, grid=None):
    """``token_ops.add_pos_and_gather`` with the table ``pos`` or ``sincos_3d(grid)``, in x's dtype."""
    from ivfast.models import token_ops

    grid = _check(x, idx, x.shape[1], pos, grid)
    return token_ops.add_pos_and_gather(x, _table(pos, grid, x.shape[-1], x.device), idx).to(x.dtype)


def scatter_with_mask_token_reference(visible, idx, mask_token, pos=None, grid=None):
    """``token_ops.scatter_with_mask_token`` with the table ``pos`` or ``sincos_3d(grid)``."""
    from ivfast.models import token_ops

    n = _num_tokens(pos, grid)
    grid = _check(visible, idx, n, pos, grid)
    if idx.shape[1] != visible.shape[1]:
        raise ValueError(f"idx {tuple(idx.shape)} does not match visible {tuple(visible.shape)}")
    return token_ops.scatter_with_mask_token(visible, idx, mask_token, _table(pos, grid, visible.shape[-1], visible.device))


def _num_tokens(pos, grid) -> int:
    if pos is not None:
        return pos.shape[0]
    if grid is not None and len(grid) == 3:
        t, h, w = (int(g) for g in grid)
        return t * h * w
    raise ValueError("give exactly one of pos (learnable (N, D) table) or grid ((t, h, w) fixed sincos)")


# --------------------------------------------------------------------------- public API
def add_pos_and_gather(
    x: torch.Tensor, idx: torch.Tensor, pos: Optional[torch.Tensor] = None, grid: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """(B, M, D) = x[b, idx[b]] + P[idx[b]], P = ``pos`` (N, D) or the fixed sincos of ``grid``."""
    grid = _check(x, idx, x.shape[1], pos, grid)
    tensors = (x, idx) if pos is None else (x, idx, pos)
    if not use_triton(*tensors):
        return add_pos_and_gather_reference(x, idx, pos, grid)
    return _AddPosGather.apply(x, idx, pos, grid)


def scatter_with_mask_token(
    visible: torch.Tensor,
    idx: torch.Tensor,
    mask_token: torch.Tensor,
    pos: Optional[torch.Tensor] = None,
    grid: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """(B, N, D): ``visible`` rows at ``idx``, ``mask_token`` (D,) elsewhere, plus P (``pos`` or sincos of ``grid``)."""
    n = _num_tokens(pos, grid)
    grid = _check(visible, idx, n, pos, grid)
    if idx.shape[1] != visible.shape[1]:
        raise ValueError(f"idx {tuple(idx.shape)} does not match visible {tuple(visible.shape)}")
    if mask_token.shape != (visible.shape[-1],):
        mask_token = mask_token.reshape(-1)
        if mask_token.shape != (visible.shape[-1],):
            raise ValueError(f"mask_token must have D = {visible.shape[-1]} elements, got {tuple(mask_token.shape)}")
    tensors = (visible, idx, mask_token) if pos is None else (visible, idx, mask_token, pos)
    if not use_triton(*tensors):
        return scatter_with_mask_token_reference(visible, idx, mask_token, pos, grid)
    return _ScatterMaskToken.apply(visible, idx, mask_token, pos, grid, n)
