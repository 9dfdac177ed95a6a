"""A test-only Triton kernel that writes Triton's own Philox draws per row (``tl.randn``,
``tl.rand`` and the raw ``tl.randint4x`` integers), to check :mod:`ivfast.ops.philox` against."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ivfast.ops import launch
from ivfast.ops.philox import MIN_U1, philox_randint4x_reference, uint32_to_uniform_reference


@triton.jit
def _philox_rows_kernel(seeds_ptr, out_ptr, M, N, stride_om,
                        WHAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[r, c] for c < N from Philox(seeds[r], c): WHAT 0 randn, 1 rand, 2 / 3 the raw i1 / i2."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    mask = rmask[:, None] & (cols < N)[None, :]
    seed = tl.load(seeds_ptr + rows, mask=rmask, other=0)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    if WHAT == 0:
        tl.store(ptrs, tl.randn(seed[:, None], cols[None, :]), mask=mask)
    elif WHAT == 1:
        tl.store(ptrs, tl.rand(seed[:, None], cols[None, :]), mask=mask)
    else:
        i1, i2, _, _ = tl.randint4x(seed[:, None], cols[None, :])
        if WHAT == 2:
            tl.store(ptrs, i1.to(tl.int64), mask=mask)
        else:
            tl.store(ptrs, i2.to(tl.int64), mask=mask)


_WHAT = {"randn": 0, "rand": 1, "i1": 2, "i2": 3}


def philox_triton(seeds: torch.Tensor, n: int, what: str = "randn") -> torch.Tensor:
    """(M, n) of Triton's draws for ``seeds`` (M,) int64: randn / rand float32, i1 / i2 the uint32
    outputs as int64. The GPU's tiles (8 x 256) or the interpreter's."""
    seeds = seeds.to(torch.int64).contiguous()
    m, n = seeds.shape[0], int(n)
    out = torch.empty((m, n), dtype=torch.float32 if what in ("randn", "rand") else torch.int64, device=seeds.device)
    if m and n:
        bm, bn, warps = (8, 256, 4) if launch.gpu_tiles(seeds.device) else launch.column_loop_tile(m, n, gpu=False)
        _philox_rows_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            seeds, out, m, n, out.stride(0), WHAT=_WHAT[what], BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    return out


def philox_rand_reference(seeds: torch.Tensor, n: int) -> torch.Tensor:
    """``tl.rand(seeds[r], c)`` for c < n: the first Philox output as a uniform in [0, 1)."""
    i1, _, _, _ = philox_randint4x_reference(seeds, n)
    return uint32_to_uniform_reference(i1)


def philox_randn_f64(seeds: torch.Tensor, n: int) -> torch.Tensor:
    """The exact normals of ``tl.randn(seeds[r], c)``: Box-Muller in float64 of the float32 uniforms
    (bit-exact), ``sqrt(-2 ln max(u1, 1e-7)) cos(2 pi u2)``; both the kernel and the float32
    reference round on the way to it."""
    i1, i2, _, _ = philox_randint4x_reference(seeds, n)
    u1 = uint32_to_uniform_reference(i1).double().clamp_min(torch.tensor(MIN_U1, dtype=torch.float32).item())
    u2 = uint32_to_uniform_reference(i2).double()
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
