"""ivfast.ops.philox: the pure-PyTorch Philox normals against Random123's test vectors and against
Triton's own ``tl.randn`` / ``tl.rand`` / ``tl.randint4x`` (a test-only kernel, tests/ops/philox_kernels.py):
the integers and uniforms bit for bit, the normals within the rule of tests.support against the
float64 Box-Muller of the same uniforms. CUDA tests run with TRITON_INTERPRET=0 on a GPU machine."""
import math

import pytest
import torch

from ivfast.ops import dispatch
from ivfast.ops import philox as P
from ivfast.ops.diffusion_noise import row_seeds
from tests.ops.common import close, cuda
from tests.ops.philox_kernels import philox_rand_reference, philox_randn_f64, philox_triton

interp = pytest.mark.skipif(not dispatch.interpreting(), reason="needs TRITON_INTERPRET=1")

# seeds that exercise both key halves, the sign bit and the extremes
EDGE_SEEDS = torch.tensor([0, 1, 2, -1, -2, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1, -2 ** 63,
                           123456789012345, -987654321987654, 42], dtype=torch.int64)


def _python_philox(ctr, key, rounds=10):
    """Philox4x32 on Python ints, written from the Random123 definition."""
    m = 0xFFFFFFFF
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(rounds):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & m, p1 & m, ((p0 >> 32) ^ c3 ^ k1) & m, p0 & m
        k0, k1 = (k0 + 0x9E3779B9) & m, (k1 + 0xBB67AE85) & m
    return c0, c1, c2, c3


def _ref4(ctr, key):
    t = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    out = P.philox_4x32_reference(*(t(c) for c in ctr), t(key[0]), t(key[1]))
    return tuple(int(o.item()) for o in out)


# ----------------------------------------------------------------------------- the reference itself
def test_mul_wide_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2 ** 32, (1000,), generator=g, dtype=torch.int64)
    x = torch.cat([x, torch.tensor([0, 1, 2 ** 16 - 1, 2 ** 16, 2 ** 31, 2 ** 32 - 1])])
    for a in (P.PHILOX_ROUND_A, P.PHILOX_ROUND_B, 0xFFFFFFFF, 1):
        hi, lo = P._mul_wide(a, x)
        want = [a * v for v in x.tolist()]
        assert hi.tolist() == [w >> 32 for w in want]
        assert lo.tolist() == [w & 0xFFFFFFFF for w in want]


def test_philox_known_answers():
    """Random123's published Philox4x32-10 test vectors, and a Python-int model."""
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, want in kat:
        assert _ref4(ctr, key) == want
        assert _python_philox(ctr, key) == want
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        v = torch.randint(0, 2 ** 32, (6,), generator=g, dtype=torch.int64).tolist()
        assert _ref4(v[:4], v[4:]) == _python_philox(v[:4], v[4:])


def test_seed_key_splits_64_bits():
    k0, k1 = P.seed_key(EDGE_SEEDS)
    for s, lo, hi in zip(EDGE_SEEDS.tolist(), k0.tolist(), k1.tolist()):
        u = s & (2 ** 64 - 1)
        assert lo == u & 0xFFFFFFFF and hi == u >> 32


def test_uniform_conversion():
    x = torch.tensor([0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32 - 2, 12345], dtype=torch.int64)
    u = P.uint32_to_uniform_reference(x)
    assert u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # ~x folding: 2^32-1 -> 0, 2^31 -> 2^31-1
    assert u[4].item() == 0.0 and u[3].item() == u[2].item()


# ----------------------------------------------------------------------------- reference vs kernel
@interp
@pytest.mark.parametrize("n", [589, 9000])
def test_integers_and_uniforms_bit_exact(n):
    seeds = EDGE_SEEDS if n < 1000 else EDGE_SEEDS[:2]
    i1, i2, _, _ = P.philox_randint4x_reference(seeds, n)
    assert torch.equal(philox_triton(seeds, n, "i1"), i1)
    assert torch.equal(philox_triton(seeds, n, "i2"), i2)
    assert torch.equal(philox_triton(seeds, n, "rand"), philox_rand_reference(seeds, n))


@interp
def test_randn_matches_kernel():
    n = 589
    ref = P.philox_randn_reference(EDGE_SEEDS, n)
    got = philox_triton(EDGE_SEEDS, n, "randn")
    close(got, philox_randn_f64(EDGE_SEEDS, n), ref, what="tl.randn")
    assert (got == ref).float().mean().item() > 0.5  # most values identical; the rest an ulp of log / cos apart


@cuda
def test_cuda_kernel_matches_reference():
    seeds = torch.cat([EDGE_SEEDS, torch.randint(-2 ** 62, 2 ** 62, (3000,), dtype=torch.int64)])
    n = 588
    i1, i2, _, _ = P.philox_randint4x_reference(seeds, n)
    s = seeds.cuda()
    assert torch.equal(philox_triton(s, n, "i1").cpu(), i1)
    assert torch.equal(philox_triton(s, n, "i2").cpu(), i2)
    assert torch.equal(philox_triton(s, n, "rand").cpu(), philox_rand_reference(seeds, n))
    truth = philox_randn_f64(seeds, n)
    ref = P.philox_randn_reference(seeds, n)
    # compiled randn: libdevice log / cos and approximate sqrt; the reference also runs on the GPU
    close(philox_triton(s, n, "randn").cpu(), truth, ref, what="compiled tl.randn")
    close(P.philox_randn_reference(s, n).cpu(), truth, ref, what="reference on CUDA")


# ----------------------------------------------------------------------------- determinism
def test_determinism_and_seed_sensitivity():
    seeds = torch.arange(16, dtype=torch.int64) * 7919 - 50
    a = P.philox_randn_reference(seeds, 64)
    assert torch.equal(a, P.philox_randn_reference(seeds.clone(), 64))
    # a row depends only on its own seed
    assert torch.equal(a[3:4], P.philox_randn_reference(seeds[3:4], 64))
    assert torch.equal(a[:, :10], P.philox_randn_reference(seeds, 10))
    b = P.philox_randn_reference(seeds + 1, 64)
    assert not torch.isclose(a, b).any()
    # flipping only the high half of the seed changes the stream too
    c = P.philox_randn_reference(seeds + (1 << 40), 64)
    assert not torch.isclose(a, c).any()


# ----------------------------------------------------------------------------- statistics
def _corr_rows(x):
    """Pearson correlation of x[i] with x[i + 1] over the columns, for each i."""
    a, b = x[:-1], x[1:]
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


@pytest.mark.parametrize("kind", ["consecutive", "hashed"])
def test_statistics(kind):
    M, C = 1024, 588
    if kind == "consecutive":  # worst case for the key schedule: seeds 0, 1, 2, ...
        seeds = torch.arange(M, dtype=torch.int64)
    else:
        seeds = row_seeds(torch.tensor([11, 12], dtype=torch.int64), M // 2)
    x = P.philox_randn_reference(seeds, C).double()
    N = x.numel()
    assert torch.isfinite(x).all()
    assert abs(x.mean().item()) < 5 / math.sqrt(N)
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2 / N)
    # tail mass vs N(0, 1): P(|x| > 1.96) = 0.05
    p = 0.05
    assert abs((x.abs() > 1.959964).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / N)
    # Kolmogorov-Smirnov distance to the normal CDF (1% critical value is 1.63 / sqrt(N))
    xs = x.flatten().sort().values
    cdf = 0.5 * (1 + torch.erf(xs / math.sqrt(2)))
    ecdf = torch.arange(1, N + 1, dtype=torch.float64) / N
    assert (cdf - ecdf).abs().max().item() < 2.0 / math.sqrt(N)
    # adjacent rows (over C columns) and adjacent columns (over M rows): each correlation is
    # ~N(0, 1/n); the max over the pairs stays under 5 sigma, the mean under 5 / sqrt(n pairs)
    r_rows = _corr_rows(x)
    r_cols = _corr_rows(x.t().contiguous())
    assert r_rows.abs().max().item() < 5 / math.sqrt(C)
    assert abs(r_rows.mean().item()) < 5 / math.sqrt(C * (M - 1))
    assert r_cols.abs().max().item() < 5 / math.sqrt(M)
    assert abs(r_cols.mean().item()) < 5 / math.sqrt(M * (C - 1))
    # full row-correlation matrix of a subset: off-diagonal entries all within 5 sigma
    sub = x[:128]
    sub = (sub - sub.mean(1, keepdim=True)) / sub.std(1, keepdim=True)
    R = sub @ sub.t() / (C - 1)
    off = R[~torch.eye(128, dtype=torch.bool)]
    assert off.abs().max().item() < 5.5 / math.sqrt(C)
    assert abs(off.std().item() * math.sqrt(C) - 1) < 0.1
