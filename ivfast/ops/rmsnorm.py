"""RMSNorm over the last dim: ``y = x * rsqrt(mean(x^2) + eps) * weight``, statistics in float32,
``y`` rounded once to x's dtype (the encoder's norm, exactly).

Backward (``xhat = x * rstd``, ``gw = dy * w``, all float32):
``dx = rstd * (gw - xhat * mean(gw * xhat))``; ``dweight = sum_rows dy * xhat``, accumulated per
program over a contiguous chunk of rows and written as (#programs, D) float32 partials that
torch sums (deterministic, no atomics). The forward saves the input and the per-row ``rstd``.
"""
from __future__ import annotations

import torch

from ivfast.ops import launch
from ivfast.ops.dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


# =========================================================================== reference
def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


# =========================================================================== kernels
if triton is not None:

    @triton.jit
    def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, R, D, eps,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < R
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        s = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(s * s, axis=1) / D + eps)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        y = (s * rstd[:, None]) * w[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)

    @triton.jit
    def _rms_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, R, D, rows_per_prog,
                        WRITE_DX: tl.constexpr, WRITE_DW: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
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
            s = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = s * rstd[:, None]
            gw = dy * w[None, :]
            c = tl.sum(gw * xhat, axis=1) / D
            if WRITE_DX:
                dx = (gw - xhat * c[:, None]) * rstd[:, None]
                tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if WRITE_DW:
                acc_dw += dy * xhat
        if WRITE_DW:
            tl.store(dw_part_ptr + pid.to(tl.int64) * D + cols, tl.sum(acc_dw, axis=0), mask=cmask)


# =========================================================================== launchers
# Each kernel's plan is a pure function of (shape, dtype, flags, target), called by the launcher
# and, through launch.capture, by ivfast.ops.compile_check (tiles independent of the dtype).
def rms_fwd_config(rows: int, d: int, dtype: torch.dtype, target: launch.Target) -> launch.Launch:
    """One program per BLOCK_M whole rows."""
    bm, bd = launch.norm_tile(rows, d, gpu=target.gpu)
    return launch.Launch.of((launch.cdiv(rows, bm),), launch.num_warps_for(bm * bd), BLOCK_M=bm, BLOCK_D=bd)


def rms_bwd_config(rows: int, d: int, dtype: torch.dtype, target: launch.Target, *, want_x: bool,
                   want_w: bool) -> launch.Launch:
    """Programs each reducing a contiguous chunk of ``rows_per_prog`` rows (a scalar of the plan)."""
    bm, bd = launch.norm_tile(rows, d, gpu=target.gpu)
    progs = launch.norm_programs(rows, bm, gpu=target.gpu, sms=target.sms)
    rows_per_prog = launch.cdiv(launch.cdiv(rows, bm), progs) * bm
    return launch.Launch.of((launch.cdiv(rows, rows_per_prog),), launch.num_warps_for(bm * bd),
                            scalars=(("rows_per_prog", rows_per_prog),),
                            WRITE_DX=want_x, WRITE_DW=want_w, BLOCK_M=bm, BLOCK_D=bd)


def _forward(x2, weight, eps):
    rows, d = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(rows, device=x2.device, dtype=torch.float32)
    if rows and d:
        plan = rms_fwd_config(rows, d, x2.dtype, launch.target(x2.device))
        launch.run("rmsnorm.fwd", _rms_fwd_kernel, plan, x2, weight, y, rstd, rows, d, float(eps))
    return y, rstd


def _backward(dy2, x2, rstd, weight, want_x: bool, want_w: bool):
    rows, d = x2.shape
    dx = torch.empty_like(x2) if want_x else None
    dw = None
    if rows and d:
        plan = rms_bwd_config(rows, d, x2.dtype, launch.target(x2.device), want_x=want_x, want_w=want_w)
        progs = plan.grid[0]
        part = torch.empty(progs, d, device=x2.device, dtype=torch.float32) if want_w else dy2
        launch.run("rmsnorm.bwd", _rms_bwd_kernel, plan, dy2, x2, weight, rstd, dx if want_x else dy2, part,
                   rows, d, plan.scalar("rows_per_prog"))
        if want_w:
            dw = part.sum(0).to(weight.dtype)
    elif want_w:
        dw = torch.zeros_like(weight)
    return dx, dw


# =========================================================================== autograd
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        weight = weight.contiguous()  # the kernels read it with unit stride
        y, rstd = _forward(x2, weight, eps)
        ctx.save_for_backward(x2, rstd, weight)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, rstd, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, x2.shape[1]).contiguous()
        dx, dw = _backward(dy2, x2, rstd, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (dx.view(ctx.shape) if dx is not None else None), dw, None


# =========================================================================== API
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: float32 statistics, output in x's dtype."""
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"weight must be (D,) with D = x.shape[-1] = {x.shape[-1]}, got {tuple(weight.shape)}")
    if triton is None or not use_triton(x, weight):
        return rmsnorm_ref(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)
