"""RMSNorm, and the residual add fused with it (the pre-norm pattern), forward and backward.

Public functions (each dispatches with ``kernels.dispatch.use_triton`` to a Triton kernel
wrapped in a ``torch.autograd.Function``, else to the plain PyTorch reference beside it):

- ``rmsnorm(x, weight, eps=1e-6) -> y``: ``y = x / sqrt(mean(x^2) + eps) * weight`` over the
  last dim, statistics in fp32, ``y`` in x's dtype: exactly ``ivfast.models.layers.RMSNorm``.
- ``add_rmsnorm(x, residual, weight, eps=1e-6) -> (normed, new_residual)``:
  ``new_residual = x + residual`` (in ``torch.result_type(x, residual)``, rounded once, as the
  eager ``x + residual`` is), ``normed = rmsnorm(new_residual, weight, eps)``. In a pre-norm
  block ``h = h + branch; y = norm(h)`` becomes ``y, h = add_rmsnorm(branch, h, norm.weight)``.

Numerics: x (and the sum) are loaded in fp32, ``rstd = rsqrt(mean(s^2) + eps)``,
``y = (s * rstd) * w`` rounded once to the output dtype (the reference's order of
operations). The normalised input is the *rounded* new residual, as in the eager model.

Backward (``xhat = s * rstd``, ``gw = dy * w``), all fp32:
``ds = rstd * (gw - xhat * mean(gw * xhat)) (+ d new_residual)``; ``dx = dresidual = ds``
(each rounded to its input's dtype); ``dweight = sum_rows dy * xhat``, accumulated per
program in fp32 over a contiguous chunk of rows and written as (#programs, D) partials that
torch sums (a deterministic two-pass reduction, no atomics). The forward saves the
(rounded) normalised input and the per-row ``rstd`` (fp32).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from kernels.dispatch import interpreting, use_triton
from kernels.sincos import next_pow2, num_warps_for


# --------------------------------------------------------------------------- kernels
@triton.jit
def _rms_fwd_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr,
    R, D, eps,
    HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    s = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        hv = s.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs, hv, mask=mask)
        s = hv.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(s * s, axis=1) / D + eps)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = (s * rstd[:, None]) * w[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _rms_bwd_kernel(
    dy_ptr, dh_ptr, h_ptr, w_ptr, rstd_ptr, dx_ptr, dr_ptr, dw_part_ptr,
    R, D, rows_per_prog,
    HAS_DH: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DR: tl.constexpr, WRITE_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_dw = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    row0 = pid * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, R)
    for start in range(row0, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        s = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = s * rstd[:, None]
        gw = dy * w[None, :]
        c = tl.sum(gw * xhat, axis=1) / D
        ds = (gw - xhat * c[:, None]) * rstd[:, None]
        if HAS_DH:
            ds += tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if WRITE_DX:
            tl.store(dx_ptr + offs, ds.to(dx_ptr.dtype.element_ty), mask=mask)
        if WRITE_DR:
            tl.store(dr_ptr + offs, ds.to(dr_ptr.dtype.element_ty), mask=mask)
        if WRITE_DW:
            acc_dw += dy * xhat
    if WRITE_DW:
        tl.store(dw_part_ptr + pid.to(tl.int64) * D + cols, tl.sum(acc_dw, axis=0), mask=cmask)


# --------------------------------------------------------------------------- launch helpers
def _tiles(rows: int, d: int) -> Tuple[int, int]:
    """(BLOCK_M, BLOCK_D): one block spans the row; rows fill a ~2K-element tile on a GPU
    (with ``num_warps_for``: ~8 elements per thread; compiled for sm_90 the forward then uses
    ~40 registers and the backward ~64, no spills), 64K under the interpreter (where each
    program costs ~1-2 ms)."""
    bd = next_pow2(d)
    budget = 65536 if interpreting() else 2048
    bm = max(1, min(next_pow2(rows), budget // bd, 256 if interpreting() else 16))
    return bm, bd


def _num_programs(rows: int, bm: int, device: torch.device) -> int:
    blocks = triton.cdiv(rows, bm)
    if device.type == "cuda":
        cap = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = 2
    return max(1, min(blocks, cap))


def _flat(t: torch.Tensor, d: int) -> torch.Tensor:
    return t.reshape(-1, d).contiguous()


def _forward(x, residual, weight, eps):
    d = x.shape[-1]
    xf = _flat(x, d)
    rows = xf.shape[0]
    if residual is not None:
        rf = _flat(residual, d)
        h_dtype = torch.result_type(x, residual)
        h = torch.empty(rows, d, device=x.device, dtype=h_dtype)
        y = torch.empty(rows, d, device=x.device, dtype=h_dtype)
    else:
        rf, h, y = xf, xf, torch.empty_like(xf)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows and d:
        bm, bd = _tiles(rows, d)
        _rms_fwd_kernel[(triton.cdiv(rows, bm),)](
            xf, rf, weight, y, h, rstd, rows, d, float(eps),
            HAS_RES=residual is not None, BLOCK_M=bm, BLOCK_D=bd, num_warps=num_warps_for(bm * bd),
        )
    return y, h, rstd


def _backward(dy, dh, h, rstd, weight, x_dtype, r_dtype, want_x, want_r, want_w):
    rows, d = h.shape
    dy = _flat(dy, d)
    dh = _flat(dh, d) if dh is not None else None
    dx = torch.empty(rows, d, device=h.device, dtype=x_dtype) if want_x else None
    dr = torch.empty(rows, d, device=h.device, dtype=r_dtype) if want_r else None
    dw = None
    if rows and d:
        bm, bd = _tiles(rows, d)
        progs = _num_programs(rows, bm, h.device)
        rows_per_prog = triton.cdiv(triton.cdiv(rows, bm), progs) * bm
        progs = triton.cdiv(rows, rows_per_prog)
        part = torch.empty(progs, d, device=h.device, dtype=torch.float32) if want_w else dy
        _rms_bwd_kernel[(progs,)](
            dy, dh if dh is not None else dy, h, weight, rstd,
            dx if want_x else dy, dr if want_r else dy, part,
            rows, d, rows_per_prog,
            HAS_DH=dh is not None, WRITE_DX=want_x, WRITE_DR=want_r, WRITE_DW=want_w,
            BLOCK_M=bm, BLOCK_D=bd, num_warps=num_warps_for(bm * bd),
        )
        if want_w:
            dw = part.sum(0).to(weight.dtype)
    elif want_w:
        dw = torch.zeros_like(weight)
    return dx, dr, dw


# --------------------------------------------------------------------------- autograd
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, h, rstd = _forward(x, None, weight, eps)
        ctx.save_for_backward(h, rstd, weight)
        ctx.x_meta = (x.shape, x.dtype)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        h, rstd, weight = ctx.saved_tensors
        shape, dtype = ctx.x_meta
        dx, _, dw = _backward(dy, None, h, rstd, weight, dtype, None,
                              ctx.needs_input_grad[0], False, ctx.needs_input_grad[1])
        return (dx.view(shape) if dx is not None else None), dw, None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, h, rstd = _forward(x, residual, weight, eps)
        ctx.save_for_backward(h, rstd, weight)
        ctx.meta = (x.shape, x.dtype, residual.dtype)
        ctx.set_materialize_grads(False)
        return y.view(x.shape), h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh):
        h, rstd, weight = ctx.saved_tensors
        shape, x_dtype, r_dtype = ctx.meta
        want_x, want_r, want_w = ctx.needs_input_grad[:3]
        if dy is None:  # only new_residual was used: its gradient passes straight through
            dx = dh.to(x_dtype) if (want_x and dh is not None) else None
            dr = dh.to(r_dtype).clone() if (want_r and dh is not None) else None
            dw = torch.zeros_like(weight) if want_w else None
            return dx, dr, dw, None
        dx, dr, dw = _backward(dy, dh, h, rstd, weight, x_dtype, r_dtype, want_x, want_r, want_w)
        return (dx.view(shape) if dx is not None else None), (dr.view(shape) if dr is not None else None), dw, None


# --------------------------------------------------------------------------- references
def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The plain PyTorch RMSNorm (the same ops as ``ivfast.models.layers.RMSNorm.forward``)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def add_rmsnorm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> Tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return rmsnorm_reference(h, weight, eps), h


# --------------------------------------------------------------------------- public API
def _check(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor] = None) -> None:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"weight must be (D,) with D = x.shape[-1] = {x.shape[-1]}, got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: fp32 statistics, output in x's dtype."""
    _check(x, weight)
    if not use_triton(x, weight):
        return rmsnorm_reference(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual), the add and the norm in one pass."""
    _check(x, weight, residual)
    if not use_triton(x, residual, weight):
        return add_rmsnorm_reference(x, residual, weight, eps)
    return _AddRMSNorm.apply(x, residual, weight, eps)
