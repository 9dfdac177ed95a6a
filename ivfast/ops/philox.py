"""Triton's Philox normal draws, per row, in pure PyTorch: the reference of ``tl.randn``.

``philox_randn_reference(seeds, n)[r, c]`` is, value for value, what ``tl.randn(seed, offset)``
of triton 3.7.1 (``triton/language/random.py``) returns for ``seed = seeds[r]`` (an int64)
and ``offset = c`` (an int32 column index). Written out:

1. Key. ``philox`` casts the seed to uint64 and, for 32-bit counters, splits it:
   ``k0 = seed & 0xFFFFFFFF`` (low half), ``k1 = (seed >> 32) & 0xFFFFFFFF`` (high half). All
   64 bits of the seed are used; negative int64 seeds are their two's-complement bits.
2. Counter. ``randint4x`` with an int32 offset: ``c0 = uint32(offset)``, ``c1 = c2 = c3 = 0``.
3. Philox 4x32, 10 rounds. Each round, with ``A = 0xD2511F53``, ``B = 0xCD9E8D57``::

       c0' = umulhi(B, c2) ^ c1 ^ k0        c1' = (B * c2) mod 2^32
       c2' = umulhi(A, c0) ^ c3 ^ k1        c3' = (A * c0) mod 2^32
       k0 += 0x9E3779B9,  k1 += 0xBB67AE85  (mod 2^32)

   ``randn`` keeps the first two outputs ``i1 = c0``, ``i2 = c1``.
4. uint -> uniform (``uint_to_uniform_float``): bitcast to int32, ``x < 0 -> -x - 1`` (that
   is ``~x``), convert to float32 (round to nearest), multiply in float32 by the float32
   constant ``4.6566127342e-10``. So ``u in [0, 1)``.
5. Box-Muller (``pair_uniform_to_normal``), float32: ``u1 = max(1e-7, u1)``,
   ``th = 6.283185307179586 * u2``, ``r = sqrt(-2 log u1)``, ``eps = r * cos(th)``.

uint32 arithmetic is emulated on int64 tensors holding values in [0, 2^32): products of a
32-bit constant and a 32-bit value are formed from 16-bit limbs so that no intermediate
exceeds 2^49 (no reliance on signed overflow).

Agreement (tests/ops/test_philox.py): steps 1-4 are integer or correctly rounded
float32 operations, so ``i1``, ``i2`` and the uniforms are bit-identical to the kernel's.
Step 5 uses ``log`` and ``cos``, whose float32 implementations differ by an ulp or so between
libraries (numpy in the interpreter, SLEEF in torch on the CPU, libdevice / approximate PTX
instructions on a GPU), so the normals agree to about 1e-6 absolute, not bit for bit.
Within one device the fused kernels regenerate exactly the same values (same code, same
inputs), which is what the fused loss needs.
"""
from __future__ import annotations

import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10

UNIFORM_SCALE = 4.6566127342e-10  # triton's scale for 32-bit ints (as a float32 constant)
TWO_PI = 6.283185307179586
MIN_U1 = 1.0e-7

_M32 = 0xFFFFFFFF
_M16 = 0xFFFF


# --------------------------------------------------------------------------- uint32 emulation
def _mul_wide(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product of constant ``a`` and uint32 values ``x``.

    ``x`` is an int64 tensor with values in [0, 2^32); ``a`` a Python int in [0, 2^32).
    Uses 16-bit limbs of x: a * x = a * x0 + (a * x1) << 16 with both partial products < 2^48.
    """
    p0 = a * (x & _M16)  # < 2^48
    p1 = a * (x >> 16)  # < 2^48
    t = p0 + ((p1 & _M16) << 16)  # < 2^48 + 2^32
    lo = t & _M32
    hi = (p1 >> 16) + (t >> 32)  # floor(a * x / 2^32) < 2^32
    return hi, lo


def philox_4x32_reference(c0, c1, c2, c3, k0, k1, n_rounds: int = N_ROUNDS):
    """Triton's ``philox_impl`` on int64 tensors holding uint32 values (broadcasting)."""
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_wide(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_wide(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def seed_key(seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k0, k1) = (low, high) 32-bit halves of int64 seeds, as triton's ``philox`` splits them."""
    s = seeds.to(torch.int64)
    return s & _M32, (s >> 32) & _M32


def philox_randint4x_reference(seeds: torch.Tensor, n: int, n_rounds: int = N_ROUNDS):
    """The four uint32 outputs (int64 tensors (M, n)) of ``tl.randint4x(seeds[r], c)``, c < n."""
    if n >= 2 ** 31:
        raise ValueError("offsets are int32 column indices; n must be < 2^31")
    k0, k1 = seed_key(seeds.reshape(-1))
    k0, k1 = k0[:, None], k1[:, None]
    c0 = torch.arange(n, dtype=torch.int64, device=seeds.device)[None, :]
    zero = torch.zeros_like(c0)
    return philox_4x32_reference(c0, zero, zero, zero, k0, k1, n_rounds)


def uint32_to_uniform_reference(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for uint32 values held in an int64 tensor."""
    folded = torch.where(x >= 2 ** 31, _M32 - x, x)  # int32 bitcast, then x < 0 -> -x - 1
    scale = torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=x.device)
    return folded.to(torch.int32).to(torch.float32) * scale


def pair_uniform_to_normal_reference(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """First output of triton's ``pair_uniform_to_normal`` (Box-Muller), float32."""
    f32 = dict(dtype=torch.float32, device=u1.device)
    u1 = torch.maximum(u1, torch.tensor(MIN_U1, **f32))
    th = torch.tensor(TWO_PI, **f32) * u2
    r = torch.sqrt(torch.tensor(-2.0, **f32) * torch.log(u1))
    return r * torch.cos(th)


def philox_randn_reference(seeds: torch.Tensor, n: int) -> torch.Tensor:
    """``tl.randn(seeds[r], c)`` for c < n: float32 (M, n), pure PyTorch (any device)."""
    if seeds.dim() != 1:
        raise ValueError(f"seeds must be 1-D (M,), got shape {tuple(seeds.shape)}")
    i1, i2, _, _ = philox_randint4x_reference(seeds, int(n))
    return pair_uniform_to_normal_reference(uint32_to_uniform_reference(i1),
                                            uint32_to_uniform_reference(i2))
