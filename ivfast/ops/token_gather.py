"""Token movements around the mask: gather by index, positions added at the kept tokens, and
the predictor input with the mask token scattered in.

- ``gather_tokens(x, idx)``: ``out[b, m] = x[b, idx[b, m]]``; with lean saves its backward
  keeps only ``idx`` (autograd's gather keeps the whole input too).
- ``add_pos_at(x, idx, pos=None, grid=None)``: ``out[b, m] = x[b, m] + P[idx[b, m]]`` for tokens
  already gathered at ``idx``; ``P`` is the learnable table ``pos`` (N, D), or the fixed 3-D
  sine-cosine of ``grid = (t, h, w)`` (computed in the kernel from the token index, no table).
- ``scatter_with_mask_token(visible, idx, mask_token, pos=None, grid=None)``: (B, N, D) with
  ``visible`` at ``idx``, ``mask_token`` elsewhere, plus ``P``, in one kernel.

Invariants: idx (B, M) integer, unique within each row (sorted ascending in practice); exactly
one of ``pos`` / ``grid``; D % 16 == 0 for ``grid``. Kernels add in float32 and round once to
the token dtype; the references compute in the token dtype.

Backward without atomics (deterministic): a kernel over blocks of positions n loops over the
batch in a fixed order, reading the inverse index ``inv[b, n]`` ((B, N) int32, -1 where masked)
and summing rows into ``grad_pos[n]`` in float32; the scatter's backward also writes
``grad_visible[b, inv[b, n]]`` and per-program float32 partials of ``grad_mask_token`` that
torch sums afterwards.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from ivfast.ops import launch
from ivfast.ops.dispatch import lean_applies, use_triton
from ivfast.ops.sincos import check_sincos_dim, sincos_3d

try:
    import triton
    import triton.language as tl

    from ivfast.ops.sincos import sincos3d_at
except ImportError:  # pragma: no cover
    triton = None

POS_TABLE, POS_SINCOS = 1, 2


# =========================================================================== references
class _GatherTokens(torch.autograd.Function):
    """``torch.gather`` over dim 1 whose backward keeps only the index."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.shape = x.shape
        return torch.gather(x, 1, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).scatter_add_(1, index, grad), None


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), idx (B, M) -> (B, M, D), ``out[b, m] = x[b, idx[b, m]]``."""
    index = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    if x.requires_grad and lean_applies(x):
        return _GatherTokens.apply(x, index)
    return torch.gather(x, 1, index)


@functools.lru_cache(maxsize=16)
def _sincos_table(d: int, grid: tuple, device: torch.device) -> torch.Tensor:
    return sincos_3d(d, *grid).to(device)


def _table(pos: Optional[torch.Tensor], grid, d: int, device) -> torch.Tensor:
    return pos if pos is not None else _sincos_table(d, tuple(grid), torch.device(device))


def add_pos_at_ref(x, idx, pos=None, grid=None):
    """``x + P[idx]`` in x's dtype (P: ``pos`` or ``sincos_3d(grid)``)."""
    grid = _check(x, idx, pos, grid, _num_tokens(pos, grid))
    return x + _table(pos, grid, x.shape[-1], x.device)[idx].to(x.dtype)


def scatter_with_mask_token_ref(visible, idx, mask_token, pos=None, grid=None):
    """``visible`` rows at ``idx``, ``mask_token`` elsewhere, plus P, in visible's dtype."""
    n = _num_tokens(pos, grid)
    grid = _check(visible, idx, pos, grid, n)
    b, _, d = visible.shape
    full = mask_token.reshape(-1).to(visible.dtype).expand(b, n, d).clone()
    full = full.scatter(1, idx.unsqueeze(-1).expand(-1, -1, d), visible)
    return full + _table(pos, grid, d, visible.device).to(visible.dtype)


# =========================================================================== kernels
if triton is not None:

    @triton.jit
    def _tile(R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's tile of an (R, D) grid: row and column indices, their masks and the
        tile's mask (grid axis 0 over rows, 1 over columns)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        rmask = rows < R
        cmask = cols < D
        return rows, cols, rmask, cmask, rmask[:, None] & cmask[None, :]

    @triton.jit
    def _plus_pos(val, pos_ptr, n, cols, mask, spn, spd, H, W, POS_MODE: tl.constexpr, DIM: tl.constexpr):
        """``val`` (rows, cols) + the position rows ``n`` (int64, one per row): the table ``pos``
        (POS_MODE 1), the sine-cosine formula computed in the kernel (POS_MODE 2) or nothing (0)."""
        if POS_MODE == 1:
            val += tl.load(pos_ptr + (n * spn)[:, None] + (cols.to(tl.int64) * spd)[None, :], mask=mask,
                           other=0.0).to(tl.float32)
        if POS_MODE == 2:
            val += sincos3d_at(n[:, None], cols[None, :], H, W, DIM)
        return val

    @triton.jit
    def _add_pos_fwd_kernel(
        x_ptr, idx_ptr, pos_ptr, out_ptr,
        R, M, D, H, W,
        sxb, sxm, sxd, sib, sim, spn, spd,
        POS_MODE: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """out[r] (r = b*M + m, contiguous (R, D)) = x[b, m] + P[idx[b, m]]."""
        rows, cols, rmask, cmask, mask = _tile(R, D, BLOCK_M, BLOCK_D)
        b = (rows // M).to(tl.int64)
        m = (rows % M).to(tl.int64)
        n = tl.load(idx_ptr + b * sib + m * sim, mask=rmask, other=0).to(tl.int64)
        c64 = cols.to(tl.int64)
        val = tl.load(x_ptr + (b * sxb + m * sxm)[:, None] + (c64 * sxd)[None, :], mask=mask, other=0.0).to(tl.float32)
        val = _plus_pos(val, pos_ptr, n, cols, mask, spn, spd, H, W, POS_MODE, DIM)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + c64[None, :], val.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _pos_grad_kernel(
        g_ptr, inv_ptr, gpos_ptr,
        B, N, D,
        sgb, sgm, sgd,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """For a block of positions n: grad_pos[n] = sum over b of g[b, inv[b, n]] (visible ones)."""
        ns, cols, nmask, cmask, mask = _tile(N, D, BLOCK_N, BLOCK_D)
        n64 = ns.to(tl.int64)
        c64 = cols.to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for b in range(B):
            b64 = tl.full((), b, tl.int64)
            j = tl.load(inv_ptr + b64 * N + n64, mask=nmask, other=-1).to(tl.int64)
            vis = j >= 0
            acc += tl.load(g_ptr + (b64 * sgb + j * sgm)[:, None] + (c64 * sgd)[None, :],
                           mask=mask & vis[:, None], other=0.0).to(tl.float32)
        tl.store(gpos_ptr + n64[:, None] * D + c64[None, :], acc.to(gpos_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scatter_fwd_kernel(
        vis_ptr, inv_ptr, mt_ptr, pos_ptr, out_ptr,
        R, N, D, H, W,
        svb, svm, svd, spn, spd,
        POS_MODE: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """out[r] (r = b*N + n) = (visible[b, inv[b, n]] if inv[b, n] >= 0 else mask_token) + P[n]."""
        rows, cols, rmask, cmask, mask = _tile(R, D, BLOCK_M, BLOCK_D)
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
        val = _plus_pos(val, pos_ptr, n, cols, mask, spn, spd, H, W, POS_MODE, DIM)
        tl.store(out_ptr + r64[:, None] * D + c64[None, :], val.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scatter_bwd_kernel(
        g_ptr, inv_ptr, gvis_ptr, gpos_ptr, gmt_part_ptr,
        B, N, M, D,
        sgb, sgn, sgd,
        WRITE_GVIS: tl.constexpr, WRITE_GPOS: tl.constexpr, WRITE_GMT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Per block of positions n, over the batch: grad_visible[b, inv] = g[b, n] (visible rows),
        grad_pos[n] = sum_b g[b, n], partial grad_mask_token = sum over masked (b, n) of g[b, n]."""
        pid_n = tl.program_id(0)
        ns, cols, nmask, cmask, mask = _tile(N, D, BLOCK_N, BLOCK_D)
        n64 = ns.to(tl.int64)
        c64 = cols.to(tl.int64)
        acc_pos = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        acc_mt = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for b in range(B):
            b64 = tl.full((), b, tl.int64)
            j = tl.load(inv_ptr + b64 * N + n64, mask=nmask, other=-1).to(tl.int64)
            vis = j >= 0
            g = tl.load(g_ptr + (b64 * sgb + n64 * sgn)[:, None] + (c64 * sgd)[None, :], mask=mask,
                        other=0.0).to(tl.float32)
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


# =========================================================================== launchers
def _num_tokens(pos, grid) -> int:
    if pos is not None and grid is None:
        return pos.shape[0]
    if pos is None and grid is not None and len(grid) == 3:
        t, h, w = (int(g) for g in grid)
        return t * h * w
    raise ValueError("give exactly one of pos (learnable (N, D) table) or grid ((t, h, w) fixed sincos)")


def _check(x: torch.Tensor, idx: torch.Tensor, pos, grid, n: int) -> Optional[tuple]:
    """Validates shapes; returns the grid as a tuple of ints (None with a table)."""
    if x.dim() != 3 or idx.dim() != 2 or idx.shape != x.shape[:2]:
        raise ValueError(f"expected tokens (B, M, D) and idx (B, M), got {tuple(x.shape)} and {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise TypeError(f"idx must be an integer tensor, got {idx.dtype}")
    d = x.shape[-1]
    if pos is not None:
        if pos.shape != (n, d):
            raise ValueError(f"pos must be (N, D) = {(n, d)}, got {tuple(pos.shape)}")
        return None
    grid = tuple(int(g) for g in grid)
    check_sincos_dim(d)
    return grid


def inverse_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N) int32: inv[b, idx[b, m]] = m, -1 at positions not in idx (idx unique per row)."""
    b, m = idx.shape
    inv = torch.full((b, n), -1, dtype=torch.int32, device=idx.device)
    if m:
        inv.scatter_(1, idx.to(torch.int64), torch.arange(m, dtype=torch.int32, device=idx.device).expand(b, m))
    return inv


def _pos_args(pos, grid, like):
    if pos is not None:
        return POS_TABLE, pos, pos.stride(0), pos.stride(1), 1, 1
    return POS_SINCOS, like, 0, 0, grid[1], grid[2]


# Each kernel's plan is a pure function of (shape, dtype, flags, target), called by the launcher
# and, through launch.capture, by ivfast.ops.compile_check (tiles independent of the dtype).
def _row_plan(rows: int, d: int, target: launch.Target, pos_mode: int) -> launch.Launch:
    # The in-kernel sine-cosine needs ~70 registers at 8 elements per thread, where ptxas may spill
    # (fp32, 1024 wide, 8 warps: 12 bytes; ivfast.ops.compile_check): its GPU tiles are 1K elements
    # over up to 8 warps, 4 per thread (40-50 registers).
    sincos = pos_mode == POS_SINCOS and target.gpu
    bm, bd = launch.row_tile(rows, d, gpu=target.gpu, max_tile=1024 if sincos else 2048)
    return launch.Launch.of((launch.cdiv(rows, bm), launch.cdiv(d, bd)),
                            launch.num_warps_for(bm * bd * (2 if sincos else 1)),
                            POS_MODE=pos_mode, DIM=d, BLOCK_M=bm, BLOCK_D=bd)


def _bwd_plan(n: int, d: int, target: launch.Target, **constexprs) -> launch.Launch:
    # The backward kernels loop over the batch and hold one or two fp32 accumulator tiles.
    bn, bd = launch.row_tile(n, d, gpu=target.gpu, max_tile=2048, max_rows=32)
    return launch.Launch.of((launch.cdiv(n, bn), launch.cdiv(d, bd)), launch.num_warps_for(bn * bd),
                            **constexprs, BLOCK_N=bn, BLOCK_D=bd)


def add_pos_fwd_config(rows: int, d: int, dtype: torch.dtype, target: launch.Target, *,
                       pos_mode: int) -> launch.Launch:
    """``rows`` = B * M gathered tokens of width d; a 2-D grid of row x column tiles."""
    return _row_plan(rows, d, target, pos_mode)


def pos_grad_config(n: int, d: int, dtype: torch.dtype, target: launch.Target) -> launch.Launch:
    """Blocks of the N positions x column tiles, each looping over the batch."""
    return _bwd_plan(n, d, target)


def scatter_fwd_config(rows: int, d: int, dtype: torch.dtype, target: launch.Target, *,
                       pos_mode: int) -> launch.Launch:
    """``rows`` = B * N output tokens."""
    return _row_plan(rows, d, target, pos_mode)


def scatter_bwd_config(n: int, d: int, dtype: torch.dtype, target: launch.Target, *, gvis: bool, gpos: bool,
                       gmt: bool) -> launch.Launch:
    return _bwd_plan(n, d, target, WRITE_GVIS=gvis, WRITE_GPOS=gpos, WRITE_GMT=gmt)


def _add_pos_forward(x, idx, pos, grid):
    bsz, m, d = x.shape
    out = torch.empty(bsz, m, d, device=x.device, dtype=x.dtype)
    r = bsz * m
    if r == 0 or d == 0:
        return out
    mode, pos_t, spn, spd, h, w = _pos_args(pos, grid, x)
    plan = add_pos_fwd_config(r, d, x.dtype, launch.target(x.device), pos_mode=mode)
    launch.run("token_gather.add_pos_fwd", _add_pos_fwd_kernel, plan,
               x, idx, pos_t, out, r, m, d, h, w,
               x.stride(0), x.stride(1), x.stride(2), idx.stride(0), idx.stride(1), spn, spd)
    return out


def _pos_grad(g, idx, n, pos_dtype):
    bsz, _, d = g.shape
    gpos = torch.empty(n, d, device=g.device, dtype=pos_dtype)
    if n and d:
        inv = inverse_index(idx, n)
        plan = pos_grad_config(n, d, g.dtype, launch.target(g.device))
        launch.run("token_gather.pos_grad", _pos_grad_kernel, plan,
                   g, inv, gpos, bsz, n, d, g.stride(0), g.stride(1), g.stride(2))
    return gpos


def _scatter_forward(visible, inv, mask_token, pos, grid):
    bsz, _, d = visible.shape
    n = inv.shape[1]
    out = torch.empty(bsz, n, d, device=visible.device, dtype=visible.dtype)
    r = bsz * n
    if r == 0 or d == 0:
        return out
    mode, pos_t, spn, spd, h, w = _pos_args(pos, grid, visible)
    plan = scatter_fwd_config(r, d, visible.dtype, launch.target(visible.device), pos_mode=mode)
    launch.run("token_gather.scatter_fwd", _scatter_fwd_kernel, plan,
               visible, inv, mask_token, pos_t, out, r, n, d, h, w,
               visible.stride(0), visible.stride(1), visible.stride(2), spn, spd)
    return out


# =========================================================================== autograd
class _AddPosAt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, pos, grid, n):
        ctx.save_for_backward(idx)
        ctx.meta = (n, None if pos is None else pos.dtype)
        return _add_pos_forward(x, idx, pos, grid)

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        n, pos_dtype = ctx.meta
        gx = g if ctx.needs_input_grad[0] else None
        gpos = _pos_grad(g, idx, n, pos_dtype) if pos_dtype is not None and ctx.needs_input_grad[2] else None
        return gx, None, gpos, None, None


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
        want_vis, want_mt = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        want_pos = pos_dtype is not None and ctx.needs_input_grad[3]
        if not (want_vis or want_mt or want_pos):
            return None, None, None, None, None, None
        gvis = torch.empty(bsz, m, d, device=g.device, dtype=vis_dtype) if want_vis else None
        gpos = torch.empty(n, d, device=g.device, dtype=pos_dtype) if want_pos else None
        gmt = None
        if n and d:
            plan = scatter_bwd_config(n, d, g.dtype, launch.target(g.device), gvis=want_vis, gpos=want_pos,
                                      gmt=want_mt)
            part = torch.empty(plan.grid[0], d, device=g.device, dtype=torch.float32) if want_mt else g
            launch.run("token_gather.scatter_bwd", _scatter_bwd_kernel, plan,
                       g, inv, gvis if want_vis else g, gpos if want_pos else g, part, bsz, n, m, d,
                       g.stride(0), g.stride(1), g.stride(2))
            if want_mt:
                gmt = part.sum(0).to(mt_dtype)
        elif want_mt:
            gmt = torch.zeros(d, device=g.device, dtype=mt_dtype)
        return gvis, None, gmt, gpos, None, None


# =========================================================================== API
def add_pos_at(x: torch.Tensor, idx: torch.Tensor, pos: Optional[torch.Tensor] = None,
               grid: Optional[Sequence[int]] = None) -> torch.Tensor:
    """(B, M, D) = x[b, m] + P[idx[b, m]]: positions of the tokens kept at ``idx``."""
    n = _num_tokens(pos, grid)
    grid = _check(x, idx, pos, grid, n)
    tensors = (x, idx) if pos is None else (x, idx, pos)
    if triton is None or not use_triton(*tensors):
        return add_pos_at_ref(x, idx, pos, grid)
    return _AddPosAt.apply(x, idx, pos, grid, n)


def scatter_with_mask_token(visible: torch.Tensor, idx: torch.Tensor, mask_token: torch.Tensor,
                            pos: Optional[torch.Tensor] = None, grid: Optional[Sequence[int]] = None) -> torch.Tensor:
    """(B, N, D): ``visible`` rows at ``idx``, ``mask_token`` (D,) elsewhere, plus P."""
    n = _num_tokens(pos, grid)
    grid = _check(visible, idx, pos, grid, n)
    if mask_token.numel() != visible.shape[-1]:
        raise ValueError(f"mask_token must have D = {visible.shape[-1]} elements, got {tuple(mask_token.shape)}")
    mask_token = mask_token.reshape(-1).contiguous()  # the kernel reads it with unit stride
    tensors = (visible, idx, mask_token) if pos is None else (visible, idx, mask_token, pos)
    if triton is None or not use_triton(*tensors):
        return scatter_with_mask_token_ref(visible, idx, mask_token, pos, grid)
    return _ScatterMaskToken.apply(visible, idx, mask_token, pos, grid, n)
