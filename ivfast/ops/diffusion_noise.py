"""Diffusion noise drawn inside the kernels: q_sample and the eps-MSE loss with no eps tensor.

Row r's noise is ``eps[r, c] = tl.randn(seeds[r], c)`` (Philox 4x32-10; :mod:`ivfast.ops.philox`
is its PyTorch reference), regenerated from the per-row int64 seed by every kernel that needs it:

- ``q_sample(x, t, seeds, sqrt_ab, sqrt_1mab)``: ``x_t = sqrt_ab[t] x + sqrt_1mab[t] eps``;
- ``eps_mse(eps_hat, seeds)``: per-row ``mean_c (eps_hat - eps)^2``, differentiable in eps_hat;
- ``row_seeds(sample_seeds, rows_per_sample)``: per-row seeds from per-sample ones.

Numerics: coefficients gathered and cast to float32; q_sample computes ``a x + b eps`` in float32
and rounds once to x's dtype; the loss accumulates in float32 and divides by C; the gradient
``(eps_hat - eps) * 2 g_r / C`` is float32, rounded once to eps_hat's dtype.

A row's noise depends only on its sample's seed and its position in the sample, not on the
rank, the batch composition or the device.
"""
from __future__ import annotations

import torch

from ivfast.ops import launch
from ivfast.ops.dispatch import use_triton
from ivfast.ops.philox import philox_randn_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

_M32 = 0xFFFFFFFF
_M16 = 0xFFFF

# splitmix64 constants
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


# --------------------------------------------------------------------------- per-row seeds
# uint64 values are held as (hi, lo) pairs of int64 tensors with values in [0, 2^32), so
# wrapping 64-bit arithmetic never overflows a signed int64.
def _split64(x: torch.Tensor):
    x = x.to(torch.int64)
    return (x >> 32) & _M32, x & _M32


def _join64(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """(hi, lo) -> int64 with those bits (two's complement)."""
    hi_signed = torch.where(hi >= 2 ** 31, hi - 2 ** 32, hi)
    return hi_signed * 2 ** 32 + lo


def _add64(a, b):
    lo = a[1] + b[1]
    return (a[0] + b[0] + (lo >> 32)) & _M32, lo & _M32


def _add64_const(a, k: int):
    return _add64(a, (k >> 32, k & _M32))


def _xor64(a, b):
    return a[0] ^ b[0], a[1] ^ b[1]


def _shr64(a, s: int):
    """Logical right shift by 0 < s < 32."""
    hi, lo = a
    return hi >> s, ((lo >> s) | (hi << (32 - s))) & _M32


def _mulmod32(x: torch.Tensor, k: int) -> torch.Tensor:
    """(x * k) mod 2^32 for x in [0, 2^32), k a 32-bit constant (16-bit limbs of x)."""
    return (x & _M16) * k + ((((x >> 16) * k) & _M16) << 16) & _M32


def _mul64_const(a, k: int):
    """(a * k) mod 2^64 for a (hi, lo) pair and a 64-bit constant k."""
    hi, lo = a
    k_hi, k_lo = k >> 32, k & _M32
    p0 = (lo & _M16) * k_lo  # < 2^48
    p1 = (lo >> 16) * k_lo  # < 2^48
    t = p0 + ((p1 & _M16) << 16)
    out_lo = t & _M32
    carry = (p1 >> 16) + (t >> 32)  # floor(lo * k_lo / 2^32)
    out_hi = (carry + _mulmod32(hi, k_lo) + _mulmod32(lo, k_hi)) & _M32
    return out_hi, out_lo


def _mix64(a):
    """splitmix64's finaliser (a bijection of 64-bit values)."""
    a = _mul64_const(_xor64(a, _shr64(a, 30)), _MIX1)
    a = _mul64_const(_xor64(a, _shr64(a, 27)), _MIX2)
    return _xor64(a, _shr64(a, 31))


def row_seeds(sample_seeds: torch.Tensor, rows_per_sample: int) -> torch.Tensor:
    """Per-row Philox seeds, int64 (B * rows_per_sample,), sample-major.

    ``seed[b * R + i] = mix64(mix64(s_b + gamma) + (i + 1) * gamma)`` in wrapping uint64
    arithmetic (splitmix64: gamma = 0x9E3779B97F4A7C15, mix64 its finaliser), returned as the
    int64 with the same 64 bits (all 64 bits key Philox). Within a sample the rows' seeds are
    distinct (mix64 is a bijection and i -> (i + 1) * gamma is injective mod 2^64); across
    samples they collide only by chance (~R^2 / 2^64). Pass a stream-specific sample seed
    (e.g. one SampleRNG derives for "diffusion_noise") so that other streams of the same
    sample stay independent of this one.
    """
    if sample_seeds.dim() != 1:
        raise ValueError(f"sample_seeds must be 1-D (B,), got {tuple(sample_seeds.shape)}")
    R = int(rows_per_sample)
    if R < 0:
        raise ValueError(f"rows_per_sample must be >= 0, got {rows_per_sample}")
    dev = sample_seeds.device
    base = _mix64(_add64_const(_split64(sample_seeds), _GAMMA))  # (B,) pair
    idx = torch.arange(1, R + 1, dtype=torch.int64, device=dev)
    step = _mul64_const(_split64(idx), _GAMMA)  # (R,) pair
    h = _mix64(_add64((base[0][:, None], base[1][:, None]), (step[0][None, :], step[1][None, :])))
    return _join64(*h).reshape(-1)


# --------------------------------------------------------------------------- references
def _check_rows(name: str, a: torch.Tensor, seeds: torch.Tensor) -> None:
    if a.dim() != 2:
        raise ValueError(f"{name} must be 2-D (M, C), got {tuple(a.shape)}")
    if seeds.dim() != 1 or seeds.shape[0] != a.shape[0]:
        raise ValueError(f"seeds must have shape ({a.shape[0]},), got {tuple(seeds.shape)}")


def q_sample_reference(x: torch.Tensor, t: torch.Tensor, seeds: torch.Tensor,
                       sqrt_ab: torch.Tensor, sqrt_1mab: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt_ab[t] x + sqrt_1mab[t] eps with eps = philox_randn_reference(seeds, C);
    coefficients gathered in float32, computed in float32, returned in x's dtype."""
    _check_rows("x", x, seeds)
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
    eps = philox_randn_reference(seeds.to(x.device), x.shape[1])
    tt = t.to(device=sqrt_ab.device, dtype=torch.long)
    a = sqrt_ab[tt].to(device=x.device, dtype=torch.float32)[:, None]
    b = sqrt_1mab[tt].to(device=x.device, dtype=torch.float32)[:, None]
    return (a * x.float() + b * eps).to(x.dtype)


def eps_mse_reference(eps_hat: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """mean_c (eps_hat - eps)^2 per row, float32 (M,), eps = philox_randn_reference(seeds, C);
    differentiable in eps_hat through ordinary autograd."""
    _check_rows("eps_hat", eps_hat, seeds)
    eps = philox_randn_reference(seeds.to(eps_hat.device), eps_hat.shape[1])
    return (eps_hat.float() - eps).pow(2).mean(dim=1)


# --------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _row_block(seeds_ptr, M, BLOCK_M: tl.constexpr):
        """This program's rows (int32 and int64), their mask and their Philox seeds."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        seed = tl.load(seeds_ptr + rows, mask=rmask, other=0)
        return rows, rows.to(tl.int64), rmask, seed

    @triton.jit
    def _tile_and_eps(ptr, rows64, rmask, seed, c0, C, stride_m, stride_c, BLOCK_C: tl.constexpr):
        """Columns ``c0 .. c0 + BLOCK_C`` of the rows ``rows64``: the tile of ``ptr`` in float32
        (0 outside the mask), the noise eps = randn(row seed, column) at the same places (the one
        way every kernel here draws it, so q_sample and the eps-MSE see the same eps), the
        columns and the mask."""
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cols < C)[None, :]
        v = tl.load(ptr + rows64[:, None] * stride_m + cols[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)
        eps = tl.randn(seed[:, None], cols[None, :])
        return v, eps, cols, mask

    @triton.jit
    def _q_sample_kernel(x_ptr, t_ptr, seeds_ptr, a_ptr, b_ptr, out_ptr,
                         M, C, T, stride_xm, stride_xc, stride_om,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        rows, rows64, rmask, seed = _row_block(seeds_ptr, M, BLOCK_M)
        t = tl.load(t_ptr + rows, mask=rmask, other=0)
        tmask = rmask & (t >= 0) & (t < T)
        a = tl.load(a_ptr + t, mask=tmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + t, mask=tmask, other=0.0).to(tl.float32)
        for c0 in range(0, C, BLOCK_C):
            x, eps, cols, mask = _tile_and_eps(x_ptr, rows64, rmask, seed, c0, C, stride_xm, stride_xc, BLOCK_C)
            y = a[:, None] * x + b[:, None] * eps
            tl.store(out_ptr + rows64[:, None] * stride_om + cols[None, :],
                     y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _eps_mse_fwd_kernel(e_ptr, seeds_ptr, out_ptr, M, C, stride_em, stride_ec,
                            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        rows, rows64, rmask, seed = _row_block(seeds_ptr, M, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            e, eps, cols, mask = _tile_and_eps(e_ptr, rows64, rmask, seed, c0, C, stride_em, stride_ec, BLOCK_C)
            d = tl.where(mask, e - eps, 0.0)
            acc += d * d
        tl.store(out_ptr + rows, tl.sum(acc, axis=1) / C, mask=rmask)

    @triton.jit
    def _eps_mse_bwd_kernel(e_ptr, seeds_ptr, g_ptr, grad_ptr, M, C,
                            stride_em, stride_ec, stride_g, stride_gm,
                            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        rows, rows64, rmask, seed = _row_block(seeds_ptr, M, BLOCK_M)
        g = tl.load(g_ptr + rows64 * stride_g, mask=rmask, other=0.0).to(tl.float32)
        scale = (2.0 * g / C)[:, None]
        for c0 in range(0, C, BLOCK_C):
            e, eps, cols, mask = _tile_and_eps(e_ptr, rows64, rmask, seed, c0, C, stride_em, stride_ec, BLOCK_C)
            grad = (e - eps) * scale
            tl.store(grad_ptr + rows64[:, None] * stride_gm + cols[None, :],
                     grad.to(grad_ptr.dtype.element_ty), mask=mask)


# Each kernel's plan is a pure function of (shape, dtype, target), called by the launchers and,
# through launch.capture, by ivfast.ops.compile_check (tiles independent of the dtype).
def philox_config(M: int, C: int, dtype: torch.dtype, target: launch.Target) -> launch.Launch:
    """q_sample and the eps-MSE kernels: one program per BLOCK_M rows, looping over column blocks."""
    block_m, block_c, warps = launch.column_loop_tile(M, C, gpu=target.gpu)
    return launch.Launch.of((launch.cdiv(M, block_m),), warps, BLOCK_M=block_m, BLOCK_C=block_c)


def _seeds(seeds: torch.Tensor, device: torch.device) -> torch.Tensor:
    return seeds.to(device=device, dtype=torch.int64).contiguous()


def _q_sample_triton(x, t, seeds, sqrt_ab, sqrt_1mab):
    M, C = x.shape
    out = torch.empty((M, C), dtype=x.dtype, device=x.device)
    if M == 0 or C == 0:
        return out
    t = t.to(device=x.device, dtype=torch.int64).contiguous()
    a = sqrt_ab.to(device=x.device).contiguous()
    b = sqrt_1mab.to(device=x.device).contiguous()
    plan = philox_config(M, C, x.dtype, launch.target(x.device))
    launch.run("diffusion_noise.q_sample", _q_sample_kernel, plan,
               x, t, _seeds(seeds, x.device), a, b, out, M, C, a.shape[0],
               x.stride(0), x.stride(1), out.stride(0))
    return out


def _eps_mse_fwd_triton(eps_hat, seeds):
    M, C = eps_hat.shape
    out = torch.empty((M,), dtype=torch.float32, device=eps_hat.device)
    if M == 0:
        return out
    plan = philox_config(M, C, eps_hat.dtype, launch.target(eps_hat.device))
    launch.run("diffusion_noise.eps_mse_fwd", _eps_mse_fwd_kernel, plan,
               eps_hat, seeds, out, M, C, eps_hat.stride(0), eps_hat.stride(1))
    return out


def _eps_mse_bwd_triton(eps_hat, seeds, grad_row):
    M, C = eps_hat.shape
    grad = torch.empty((M, C), dtype=eps_hat.dtype, device=eps_hat.device)
    if M == 0 or C == 0:
        return grad
    grad_row = grad_row.to(device=eps_hat.device)
    plan = philox_config(M, C, eps_hat.dtype, launch.target(eps_hat.device))
    launch.run("diffusion_noise.eps_mse_bwd", _eps_mse_bwd_kernel, plan,
               eps_hat, seeds, grad_row, grad, M, C, eps_hat.stride(0), eps_hat.stride(1),
               grad_row.stride(0), grad.stride(0))
    return grad


class EpsMSEFunction(torch.autograd.Function):
    """Per-row mean (eps_hat - eps)^2 with eps regenerated from Philox in forward and backward.

    Saves eps_hat (a view, no copy) and the seeds; no (M, C) noise tensor exists at any time.
    """

    @staticmethod
    def forward(ctx, eps_hat: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        seeds = _seeds(seeds, eps_hat.device)
        ctx.save_for_backward(eps_hat, seeds)
        return _eps_mse_fwd_triton(eps_hat, seeds)

    @staticmethod
    def backward(ctx, grad_row: torch.Tensor):
        eps_hat, seeds = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        return _eps_mse_bwd_triton(eps_hat, seeds, grad_row), None


# --------------------------------------------------------------------------- public API
def q_sample(x: torch.Tensor, t: torch.Tensor, seeds: torch.Tensor,
             sqrt_ab: torch.Tensor, sqrt_1mab: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt_ab[t] * x + sqrt_1mab[t] * eps, eps[r, c] = tl.randn(seeds[r], c).

    x (M, C) float (any strides; no gradient flows to it), t (M,) integer timesteps in
    [0, T), seeds (M,) int64, tables (T,) float64 or float32. Returns x_t (M, C) contiguous in
    x's dtype. The kernel reads x once and writes x_t once; no noise tensor is created. An
    out-of-range t gives zero coefficients in the kernel (the reference raises).
    """
    _check_rows("x", x, seeds)
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
    if triton is not None and use_triton(x, t, seeds):
        return _q_sample_triton(x.detach(), t, seeds, sqrt_ab, sqrt_1mab)
    return q_sample_reference(x.detach(), t, seeds, sqrt_ab, sqrt_1mab)


def eps_mse(eps_hat: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Per-row mean over C of (eps_hat - eps)^2, float32 (M,), eps[r, c] = tl.randn(seeds[r], c).

    eps_hat (M, C) float32 or bfloat16, any strides (e.g. ``out[:, :C]`` of an (M, 2C) model
    output). Differentiable in eps_hat: the backward regenerates eps and returns
    2 (eps_hat - eps) / C * grad_row in eps_hat's dtype.
    """
    _check_rows("eps_hat", eps_hat, seeds)
    if triton is not None and use_triton(eps_hat, seeds):
        return EpsMSEFunction.apply(eps_hat, seeds)
    return eps_mse_reference(eps_hat, seeds)
