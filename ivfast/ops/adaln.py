"""adaLN blocks of the diffusion head, fused: one residual block and the final layer.

Block (width N, rows M; ``mod = Linear(silu_y)`` split into shift | scale | gate, silu_y =
SiLU(y) computed once for all blocks)::

    h = LN(x) * (1 + scale) + shift           # kernel a (whole rows in registers)
    h = Linear2(SiLU(Linear1(h)))             # bias + SiLU fused (kernel b); matmuls stay cuBLAS
    out = x + gate * h                        # kernel c

Final layer: ``Linear(LN_noaffine(x) * (1 + scale) + shift)``, ``mod = Linear(silu_y)`` (M, 2N).

Numerics: kernels load in their inputs' dtype, compute in float32 and round once; LayerNorm
statistics are float32 (biased variance, rsqrt(var + eps)); column sums for the parameter
gradients accumulate float32 per program and are summed by torch. The references compute in
x's dtype with the parameters cast to it (the head's own layers).

Saved for backward per block row: x, ``mod`` (one (M, 3N) storage), Linear1's output ``a``
before its bias, Linear2's output h and float32 mean/rstd; SiLU(y) once for all blocks. The
LN output, the modulated LN output and SiLU(a) are recomputed by the backward kernels, so the
autograd Functions own the matmuls too; the adaLN gradients are written straight into one
(M, 3N) buffer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ivfast.ops import launch
from ivfast.ops.dispatch import autocast_enabled, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_LN_WIDTH = 16384  # a LayerNorm row is held in registers; wider rows use the reference


# =========================================================================== references
def _lin(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear`` in x's dtype (the parameters cast on use)."""
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _ln(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    cast = lambda t: None if t is None else t.to(x.dtype)  # noqa: E731
    return F.layer_norm(x, (x.shape[-1],), cast(weight), cast(bias), eps)


def adaln_block_ref(x, silu_y, ada_w, ada_b, ln_w, ln_b, w1, b1, w2, b2, eps: float = 1e-6):
    """``x + gate * Linear2(SiLU(Linear1(LN(x) * (1 + scale) + shift)))``, mod = Linear(silu_y)."""
    shift, scale, gate = _lin(silu_y, ada_w, ada_b).chunk(3, dim=-1)
    h = _ln(x, ln_w, ln_b, eps) * (1.0 + scale) + shift
    return x + gate * _lin(F.silu(_lin(h, w1, b1)), w2, b2)


def adaln_final_ref(x, silu_y, ada_w, ada_b, lin_w, lin_b, eps: float = 1e-6):
    """``Linear(LN_noaffine(x) * (1 + scale) + shift)``, mod = Linear(silu_y)."""
    shift, scale = _lin(silu_y, ada_w, ada_b).chunk(2, dim=-1)
    return _lin(_ln(x, None, None, eps) * (1.0 + scale) + shift, lin_w, lin_b)


# =========================================================================== kernels
if triton is not None:

    @triton.jit
    def _ln_mod_fwd_kernel(X, SHIFT, SCALE, W, B, OUT, MEAN, RSTD,
                           M, N, s_x, s_shift, s_scale, s_out, eps,
                           HAS_AFFINE: tl.constexpr, SAVE_STATS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """out = (xhat * w + b) * (1 + scale) + shift; one program = BLOCK_M whole rows."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        rmask = rows < M
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        r = rows.to(tl.int64)[:, None]
        c = cols[None, :]
        x = tl.load(X + r * s_x + c, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        ln = xc * rstd[:, None]
        if HAS_AFFINE:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
            b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
            ln = ln * w[None, :] + b[None, :]
        sc = tl.load(SCALE + r * s_scale + c, mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(SHIFT + r * s_shift + c, mask=mask, other=0.0).to(tl.float32)
        out = ln * (1.0 + sc) + sh
        tl.store(OUT + r * s_out + c, out.to(OUT.dtype.element_ty), mask=mask)
        if SAVE_STATS:
            tl.store(MEAN + rows, mean, mask=rmask)
            tl.store(RSTD + rows, rstd, mask=rmask)

    @triton.jit
    def _ln_mod_bwd_kernel(X, SHIFT, SCALE, W, B, DOUT, DRES, MEAN, RSTD,
                           DX, DSHIFT, DSCALE, HMOD, PART,
                           M, N, s_x, s_shift, s_scale, s_dout, s_dres,
                           s_dx, s_dshift, s_dscale, s_hmod, num_tiles,
                           HAS_AFFINE: tl.constexpr, HAS_DRES: tl.constexpr,
                           WRITE_DSHIFT: tl.constexpr, RECOMPUTE: tl.constexpr,
                           COLSUM: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Backward of ln_modulate from the saved x, mean, rstd (the LN output is recomputed).

        dscale = g * ln; dln = g * (1 + scale); dxhat = dln * w;
        dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) [+ dres].
        Optional: dshift = g copied into DSHIFT, the modulated output recomputed into HMOD.
        PART[pid] rows: 0 dw, 1 db (HAS_AFFINE), 2 sum g, 3 sum dscale (COLSUM), float32.
        Program pid handles row tiles pid, pid + P, pid + 2P, ...
        """
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        c = cols[None, :]
        if HAS_AFFINE:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
            b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        acc_dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_db = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_dsh = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_dsc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for tile in range(pid, num_tiles, nprog):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            rmask = rows < M
            mask = rmask[:, None] & cmask[None, :]
            r = rows.to(tl.int64)[:, None]
            x = tl.load(X + r * s_x + c, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            if HAS_AFFINE:
                ln = xhat * w[None, :] + b[None, :]
            else:
                ln = xhat
            sc = tl.load(SCALE + r * s_scale + c, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(DOUT + r * s_dout + c, mask=mask, other=0.0).to(tl.float32)
            dsc = g * ln
            dln = g * (1.0 + sc)
            if HAS_AFFINE:
                acc_dw += tl.sum(dln * xhat, axis=0)
                acc_db += tl.sum(dln, axis=0)
                dxhat = dln * w[None, :]
            else:
                dxhat = dln
            c1 = tl.sum(dxhat * xhat, axis=1) / N
            c2 = tl.sum(dxhat, axis=1) / N
            dx = (dxhat - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
            if HAS_DRES:
                dx += tl.load(DRES + r * s_dres + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + r * s_dx + c, dx.to(DX.dtype.element_ty), mask=mask)
            tl.store(DSCALE + r * s_dscale + c, dsc.to(DSCALE.dtype.element_ty), mask=mask)
            if WRITE_DSHIFT:
                tl.store(DSHIFT + r * s_dshift + c, g.to(DSHIFT.dtype.element_ty), mask=mask)
            if COLSUM:
                acc_dsh += tl.sum(g, axis=0)
                acc_dsc += tl.sum(dsc, axis=0)
            if RECOMPUTE:
                sh = tl.load(SHIFT + r * s_shift + c, mask=mask, other=0.0).to(tl.float32)
                hm = ln * (1.0 + sc) + sh
                tl.store(HMOD + r * s_hmod + c, hm.to(HMOD.dtype.element_ty), mask=mask)
        part = PART + pid.to(tl.int64) * 4 * N + cols
        if HAS_AFFINE:
            tl.store(part, acc_dw, mask=cmask)
            tl.store(part + N, acc_db, mask=cmask)
        if COLSUM:
            tl.store(part + 2 * N, acc_dsh, mask=cmask)
            tl.store(part + 3 * N, acc_dsc, mask=cmask)

    @triton.jit
    def _bias_silu_fwd_kernel(A, BIAS, OUT, M, N, s_a, s_out,
                              HAS_BIAS: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """out = SiLU(a + bias); 2-D grid of (BLOCK_M, BLOCK_N) tiles."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        mask = (rows < M)[:, None] & cmask[None, :]
        r = rows.to(tl.int64)[:, None]
        c = cols[None, :]
        v = tl.load(A + r * s_a + c, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            v += tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        out = v * tl.sigmoid(v)
        tl.store(OUT + r * s_out + c, out.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _bias_silu_bwd_kernel(A, BIAS, DS, DA, S, PART, M, N, s_a, s_ds, s_da, s_s,
                              num_row_tiles,
                              HAS_BIAS: tl.constexpr, RECOMPUTE: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """da = ds * SiLU'(a + bias), SiLU recomputed from the pre-activation.

        Optional: SiLU(a + bias) recomputed into S. PART[pid_m] = column sums of da (float32).
        Program (pid_m, pid_n) handles row tiles pid_m, pid_m + P, ... of column tile pid_n.
        """
        pid_m = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        c = cols[None, :]
        if HAS_BIAS:
            bias = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for tile in range(pid_m, num_row_tiles, nprog):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            mask = (rows < M)[:, None] & cmask[None, :]
            r = rows.to(tl.int64)[:, None]
            v = tl.load(A + r * s_a + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                v += bias[None, :]
            sig = tl.sigmoid(v)
            g = tl.load(DS + r * s_ds + c, mask=mask, other=0.0).to(tl.float32)
            da = g * sig * (1.0 + v * (1.0 - sig))
            tl.store(DA + r * s_da + c, da.to(DA.dtype.element_ty), mask=mask)
            if RECOMPUTE:
                tl.store(S + r * s_s + c, (v * sig).to(S.dtype.element_ty), mask=mask)
            if HAS_BIAS:
                acc += tl.sum(da, axis=0)
        if HAS_BIAS:
            tl.store(PART + pid_m.to(tl.int64) * N + cols, acc, mask=cmask)

    @triton.jit
    def _gated_fwd_kernel(X, GATE, H, OUT, M, N, s_x, s_gate, s_h, s_out,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """out = x + gate * h."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        r = rows.to(tl.int64)[:, None]
        c = cols[None, :]
        x = tl.load(X + r * s_x + c, mask=mask, other=0.0).to(tl.float32)
        gt = tl.load(GATE + r * s_gate + c, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + r * s_h + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + r * s_out + c, (x + gt * h).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_bwd_kernel(DOUT, GATE, H, DGATE, DH, PART, M, N,
                          s_dout, s_gate, s_h, s_dgate, s_dh, num_row_tiles,
                          COLSUM: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dgate = g * h, dh = g * gate (dx = g needs no kernel).

        PART[pid_m] rows: 0 sum dgate, 1 sum dh (COLSUM), float32.
        """
        pid_m = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        c = cols[None, :]
        acc_dg = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_dh = tl.zeros([BLOCK_N], dtype=tl.float32)
        for tile in range(pid_m, num_row_tiles, nprog):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            mask = (rows < M)[:, None] & cmask[None, :]
            r = rows.to(tl.int64)[:, None]
            g = tl.load(DOUT + r * s_dout + c, mask=mask, other=0.0).to(tl.float32)
            gt = tl.load(GATE + r * s_gate + c, mask=mask, other=0.0).to(tl.float32)
            h = tl.load(H + r * s_h + c, mask=mask, other=0.0).to(tl.float32)
            dg = g * h
            dh = g * gt
            tl.store(DGATE + r * s_dgate + c, dg.to(DGATE.dtype.element_ty), mask=mask)
            tl.store(DH + r * s_dh + c, dh.to(DH.dtype.element_ty), mask=mask)
            if COLSUM:
                acc_dg += tl.sum(dg, axis=0)
                acc_dh += tl.sum(dh, axis=0)
        if COLSUM:
            part = PART + pid_m.to(tl.int64) * 2 * N + cols
            tl.store(part, acc_dg, mask=cmask)
            tl.store(part + N, acc_dh, mask=cmask)


# =========================================================================== launchers
# All take 2-D tensors with unit column stride (row stride free: the adaLN thirds are views).
# Each kernel's plan (grid, num_warps, constexprs) is a pure function of (shape, dtype, flags,
# target) below, called by its launcher and, through launch.capture, by ivfast.ops.compile_check.
# The tiles do not depend on the dtype today (bf16 and fp32 take the same ones).
def _rows2d(t: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) -> a 2-D (rows, n) tensor with unit column stride (a view where possible)."""
    t2 = t if t.dim() == 2 else t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _dummy(device: torch.device) -> torch.Tensor:
    return torch.empty(1, dtype=torch.float32, device=device)


def ln_mod_fwd_config(M: int, N: int, dtype: torch.dtype, target: launch.Target, *, affine: bool,
                      save_stats: bool) -> launch.Launch:
    """LayerNorm + modulation forward: one program per BLOCK_M whole rows."""
    bm, bn, nw = launch.whole_row_tile(M, N, gpu=target.gpu, backward=False)
    return launch.Launch.of((launch.cdiv(M, bm),), nw, HAS_AFFINE=affine, SAVE_STATS=save_stats,
                            BLOCK_M=bm, BLOCK_N=bn)


def ln_mod_bwd_config(M: int, N: int, dtype: torch.dtype, target: launch.Target, *, affine: bool, dres: bool,
                      dshift: bool, recompute: bool, colsum: bool) -> launch.Launch:
    """LayerNorm + modulation backward: a few programs per SM looping over row tiles."""
    bm, bn, nw = launch.whole_row_tile(M, N, gpu=target.gpu, backward=True)
    programs = launch.looping_programs(launch.cdiv(M, bm), gpu=target.gpu, sms=target.sms)
    return launch.Launch.of((programs,), nw, HAS_AFFINE=affine, HAS_DRES=dres, WRITE_DSHIFT=dshift,
                            RECOMPUTE=recompute, COLSUM=colsum, BLOCK_M=bm, BLOCK_N=bn)


def _elementwise(M: int, N: int, target: launch.Target, looping: bool, **flags) -> launch.Launch:
    bm, bn, nw = launch.elementwise_tile(M, N, gpu=target.gpu)
    rows, cols = launch.cdiv(M, bm), launch.cdiv(N, bn)
    if looping:
        rows = launch.looping_programs(rows, gpu=target.gpu, sms=target.sms, col_tiles=cols)
    return launch.Launch.of((rows, cols), nw, **flags, BLOCK_M=bm, BLOCK_N=bn)


def bias_silu_fwd_config(M: int, N: int, dtype: torch.dtype, target: launch.Target, *,
                         has_bias: bool) -> launch.Launch:
    return _elementwise(M, N, target, False, HAS_BIAS=has_bias)


def bias_silu_bwd_config(M: int, N: int, dtype: torch.dtype, target: launch.Target, *, has_bias: bool,
                         recompute: bool) -> launch.Launch:
    return _elementwise(M, N, target, True, HAS_BIAS=has_bias, RECOMPUTE=recompute)


def gated_fwd_config(M: int, N: int, dtype: torch.dtype, target: launch.Target) -> launch.Launch:
    return _elementwise(M, N, target, False)


def gated_bwd_config(M: int, N: int, dtype: torch.dtype, target: launch.Target, *, colsum: bool) -> launch.Launch:
    return _elementwise(M, N, target, True, COLSUM=colsum)


def _ln_mod_fwd(x, shift, scale, weight, bias, eps: float, save_stats: bool = True,
                out: Optional[torch.Tensor] = None):
    M, N = x.shape
    dev = x.device
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=dev)
    if save_stats:
        mean = torch.empty(M, dtype=torch.float32, device=dev)
        rstd = torch.empty(M, dtype=torch.float32, device=dev)
    else:
        mean = rstd = _dummy(dev)
    affine = weight is not None
    plan = ln_mod_fwd_config(M, N, x.dtype, launch.target(dev), affine=affine, save_stats=save_stats)
    launch.run("adaln.ln_mod_fwd", _ln_mod_fwd_kernel, plan,
               x, shift, scale, weight if affine else _dummy(dev), bias if affine else _dummy(dev),
               out, mean, rstd, M, N, x.stride(0), shift.stride(0), scale.stride(0), out.stride(0), float(eps))
    return out, (mean if save_stats else None), (rstd if save_stats else None)


def _ln_mod_bwd(x, scale, dout, mean, rstd, weight, bias, *, shift=None, dres=None,
                dx=None, dscale=None, dshift=None, hmod=None, colsum: bool = False):
    """Returns (dx, dscale, hmod or None, partial sums (4, N) float32 or None).

    hmod is recomputed when ``shift`` is given; ``dshift`` (a buffer) receives a copy of dout.
    """
    M, N = x.shape
    dev = x.device
    dx = torch.empty((M, N), dtype=x.dtype, device=dev) if dx is None else dx
    dscale = torch.empty((M, N), dtype=scale.dtype, device=dev) if dscale is None else dscale
    recompute = shift is not None
    if recompute and hmod is None:
        hmod = torch.empty((M, N), dtype=x.dtype, device=dev)
    affine = weight is not None
    plan = ln_mod_bwd_config(M, N, x.dtype, launch.target(dev), affine=affine, dres=dres is not None,
                             dshift=dshift is not None, recompute=recompute, colsum=colsum)
    num_tiles = launch.cdiv(M, plan.const("BLOCK_M"))
    P = plan.grid[0]
    need_part = affine or colsum
    part = torch.empty((P, 4, N), dtype=torch.float32, device=dev) if need_part else _dummy(dev)
    d = _dummy(dev)
    launch.run("adaln.ln_mod_bwd", _ln_mod_bwd_kernel, plan,
               x, shift if recompute else d, scale, weight if affine else d, bias if affine else d,
               dout, dres if dres is not None else d, mean, rstd,
               dx, dshift if dshift is not None else d, dscale, hmod if recompute else d, part,
               M, N, x.stride(0), shift.stride(0) if recompute else 0, scale.stride(0), dout.stride(0),
               dres.stride(0) if dres is not None else 0, dx.stride(0),
               dshift.stride(0) if dshift is not None else 0, dscale.stride(0),
               hmod.stride(0) if recompute else 0, num_tiles)
    sums = part.sum(0) if need_part else None
    return dx, dscale, hmod, sums


def _bias_silu_fwd(a, bias):
    M, N = a.shape
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    plan = bias_silu_fwd_config(M, N, a.dtype, launch.target(a.device), has_bias=bias is not None)
    launch.run("adaln.bias_silu_fwd", _bias_silu_fwd_kernel, plan,
               a, bias if bias is not None else _dummy(a.device), out, M, N, a.stride(0), out.stride(0))
    return out


def _bias_silu_bwd(a, bias, ds, recompute: bool = False):
    """Returns (da, SiLU(a + bias) or None, column sums of da (N,) float32 or None)."""
    M, N = a.shape
    dev = a.device
    da = torch.empty((M, N), dtype=a.dtype, device=dev)
    s = torch.empty((M, N), dtype=a.dtype, device=dev) if recompute else None
    has_bias = bias is not None
    plan = bias_silu_bwd_config(M, N, a.dtype, launch.target(dev), has_bias=has_bias, recompute=recompute)
    num_row_tiles = launch.cdiv(M, plan.const("BLOCK_M"))
    P = plan.grid[0]
    part = torch.empty((P, N), dtype=torch.float32, device=dev) if has_bias else _dummy(dev)
    launch.run("adaln.bias_silu_bwd", _bias_silu_bwd_kernel, plan,
               a, bias if has_bias else _dummy(dev), ds, da, s if recompute else _dummy(dev), part,
               M, N, a.stride(0), ds.stride(0), da.stride(0), s.stride(0) if recompute else 0, num_row_tiles)
    return da, s, (part.sum(0) if has_bias else None)


def _gated_fwd(x, gate, h):
    M, N = x.shape
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    plan = gated_fwd_config(M, N, x.dtype, launch.target(x.device))
    launch.run("adaln.gated_fwd", _gated_fwd_kernel, plan,
               x, gate, h, out, M, N, x.stride(0), gate.stride(0), h.stride(0), out.stride(0))
    return out


def _gated_bwd(dout, gate, h, *, dgate=None, colsum: bool = False):
    """Returns (dgate, dh, partial sums (2, N) float32 [sum dgate, sum dh] or None)."""
    M, N = dout.shape
    dev = dout.device
    dgate = torch.empty((M, N), dtype=gate.dtype, device=dev) if dgate is None else dgate
    dh = torch.empty((M, N), dtype=h.dtype, device=dev)
    plan = gated_bwd_config(M, N, dout.dtype, launch.target(dev), colsum=colsum)
    num_row_tiles = launch.cdiv(M, plan.const("BLOCK_M"))
    P = plan.grid[0]
    part = torch.empty((P, 2, N), dtype=torch.float32, device=dev) if colsum else _dummy(dev)
    launch.run("adaln.gated_bwd", _gated_bwd_kernel, plan,
               dout, gate, h, dgate, dh, part, M, N, dout.stride(0), gate.stride(0), h.stride(0),
               dgate.stride(0), dh.stride(0), num_row_tiles)
    return dgate, dh, (part.sum(0) if colsum else None)


# =========================================================================== autograd
def _cast(t: Optional[torch.Tensor], like: Optional[torch.Tensor]):
    return None if t is None or like is None else t.to(like.dtype)


class _AdaLNBlockFn(torch.autograd.Function):
    """x + gate * Linear2(SiLU(Linear1(LN(x) * (1 + scale) + shift))), mod = Linear(silu_y).

    Saved: x, silu_y (shared by all blocks), mod (M, 3N), mean/rstd (M,) float32, a (M, N)
    = Linear1 output without its bias, h (M, N) = Linear2 output, and the weights.
    """

    @staticmethod
    def forward(ctx, x, silu_y, ada_w, ada_b, ln_w, ln_b, w1, b1, w2, b2, eps):
        n = x.shape[1]
        mod = F.linear(silu_y, ada_w, ada_b)
        shift, scale, gate = mod[:, :n], mod[:, n:2 * n], mod[:, 2 * n:]
        hmod, mean, rstd = _ln_mod_fwd(x, shift, scale, ln_w, ln_b, eps)
        a = torch.mm(hmod, w1.t())
        del hmod
        s = _bias_silu_fwd(a, b1)
        h = F.linear(s, w2, b2)
        del s
        out = _gated_fwd(x, gate, h)
        ctx.save_for_backward(x, silu_y, mod, mean, rstd, a, h, ada_w, ada_b, ln_w, ln_b,
                              w1, b1, w2, b2)
        return out

    @staticmethod
    def backward(ctx, dout):
        (x, silu_y, mod, mean, rstd, a, h, ada_w, ada_b, ln_w, ln_b,
         w1, b1, w2, b2) = ctx.saved_tensors
        nig = ctx.needs_input_grad
        n = x.shape[1]
        dout = _rows2d(dout, n)
        shift, scale, gate = mod[:, :n], mod[:, n:2 * n], mod[:, 2 * n:]
        d_mod = torch.empty_like(mod)
        # x + gate * h: dgate straight into d_mod, column sums give d ada_b[2n:] and d b2
        _, dh, sums_g = _gated_bwd(dout, gate, h, dgate=d_mod[:, 2 * n:], colsum=True)
        ds = torch.mm(dh, w2)
        da, s, db1 = _bias_silu_bwd(a, b1, ds, recompute=nig[8])
        del ds
        dw2 = torch.mm(dh.t(), s) if nig[8] else None
        del s, dh
        d_hmod = torch.mm(da, w1)
        dx, _, hmod, sums_ln = _ln_mod_bwd(
            x, scale, d_hmod, mean, rstd, ln_w, ln_b, shift=shift if nig[6] else None,
            dres=dout, dscale=d_mod[:, n:2 * n], dshift=d_mod[:, :n], colsum=True)
        del d_hmod
        dw1 = torch.mm(da.t(), hmod) if nig[6] else None
        del hmod, da
        d_silu_y = torch.mm(d_mod, ada_w) if nig[1] else None
        d_ada_w = torch.mm(d_mod.t(), silu_y) if nig[2] else None
        d_ada_b = None
        if ada_b is not None and nig[3]:
            d_ada_b = torch.cat([sums_ln[2], sums_ln[3], sums_g[0]]).to(ada_b.dtype)
        d_ln_w = d_ln_b = None
        if ln_w is not None:
            d_ln_w, d_ln_b = sums_ln[0].to(ln_w.dtype), sums_ln[1].to(ln_b.dtype)
        return (dx, d_silu_y, d_ada_w, d_ada_b, d_ln_w, d_ln_b, dw1, _cast(db1, b1), dw2,
                _cast(sums_g[1], b2), None)


class _FinalLayerFn(torch.autograd.Function):
    """Linear(LN_noaffine(x) * (1 + scale) + shift), mod = Linear(silu_y) (M, 2N).

    Saved: x, silu_y, mod, mean/rstd; the Linear's input is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, x, silu_y, ada_w, ada_b, lin_w, lin_b, eps):
        n = x.shape[1]
        mod = F.linear(silu_y, ada_w, ada_b)
        hmod, mean, rstd = _ln_mod_fwd(x, mod[:, :n], mod[:, n:], None, None, eps)
        out = F.linear(hmod, lin_w, lin_b)
        ctx.save_for_backward(x, silu_y, mod, mean, rstd, ada_w, ada_b, lin_w, lin_b)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, silu_y, mod, mean, rstd, ada_w, ada_b, lin_w, lin_b = ctx.saved_tensors
        nig = ctx.needs_input_grad
        n = x.shape[1]
        dout = _rows2d(dout, lin_w.shape[0])
        d_mod = torch.empty_like(mod)
        d_hmod = torch.mm(dout, lin_w)
        dx, _, hmod, sums = _ln_mod_bwd(
            x, mod[:, n:], d_hmod, mean, rstd, None, None,
            shift=mod[:, :n] if nig[4] else None,
            dscale=d_mod[:, n:], dshift=d_mod[:, :n], colsum=True)
        del d_hmod
        d_lin_w = torch.mm(dout.t(), hmod) if nig[4] else None
        del hmod
        d_lin_b = dout.sum(0, dtype=torch.float32).to(lin_b.dtype) \
            if lin_b is not None and nig[5] else None
        d_silu_y = torch.mm(d_mod, ada_w) if nig[1] else None
        d_ada_w = torch.mm(d_mod.t(), silu_y) if nig[2] else None
        d_ada_b = None
        if ada_b is not None and nig[3]:
            d_ada_b = torch.cat([sums[2], sums[3]]).to(ada_b.dtype)
        return dx, d_silu_y, d_ada_w, d_ada_b, d_lin_w, d_lin_b, None


# =========================================================================== API
def _kernel_ok(x, silu_y, params) -> bool:
    """The Functions need one dtype throughout, matching shapes, no autocast and rows that fit."""
    ts = [x, silu_y] + [p for p in params if p is not None]
    if x.shape != silu_y.shape or any(t.dtype != x.dtype for t in ts) or x.dtype not in _KERNEL_DTYPES:
        return False
    if autocast_enabled(x.device) or x.shape[-1] > _MAX_LN_WIDTH:
        return False
    return triton is not None and use_triton(*ts)


def adaln_block(x: torch.Tensor, silu_y: torch.Tensor, ada_w, ada_b, ln_w, ln_b, w1, b1, w2, b2,
                eps: float = 1e-6) -> torch.Tensor:
    """One adaLN residual block on (..., N) rows; the kernels when :func:`_kernel_ok`, else the reference."""
    params = (ada_w, ada_b, ln_w, ln_b, w1, b1, w2, b2)
    if not _kernel_ok(x, silu_y, params):
        return adaln_block_ref(x, silu_y, *params, eps=eps)
    n = x.shape[-1]
    ln_w, ln_b, b1 = (None if p is None else p.contiguous() for p in (ln_w, ln_b, b1))  # read by the kernels
    return _AdaLNBlockFn.apply(_rows2d(x, n), _rows2d(silu_y, n), ada_w, ada_b, ln_w, ln_b, w1, b1, w2, b2,
                               float(eps)).reshape(x.shape)


def adaln_final(x: torch.Tensor, silu_y: torch.Tensor, ada_w, ada_b, lin_w, lin_b,
                eps: float = 1e-6) -> torch.Tensor:
    """The final adaLN layer on (..., N) rows -> (..., out)."""
    params = (ada_w, ada_b, lin_w, lin_b)
    if not _kernel_ok(x, silu_y, params):
        return adaln_final_ref(x, silu_y, *params, eps=eps)
    n = x.shape[-1]
    out = _FinalLayerFn.apply(_rows2d(x, n), _rows2d(silu_y, n), *params, float(eps))
    return out.reshape(*x.shape[:-1], lin_w.shape[0])
