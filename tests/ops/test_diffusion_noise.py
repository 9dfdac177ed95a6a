"""ivfast.ops.diffusion_noise: per-row seeds, and q_sample / eps-MSE with Philox noise drawn in the
kernels, against their references (forward and gradients) under the rule of tests.support. The
exact values use the float64 Box-Muller of the Philox uniforms (tests/ops/philox_kernels.py): the
kernel's tl.randn and the float32 reference both round on the way to them. CUDA tests run with
TRITON_INTERPRET=0 on a GPU machine; the kernels' sm_90 build is checked with Triton's ptxas."""
import math
import re

import pytest
import torch

from ivfast.ops import diffusion_noise as DN
from ivfast.ops import dispatch, launch
from ivfast.ops.philox import philox_randn_reference
from tests.ops.common import DEVICE, NoLaunch, check_op, close, compiled_python, cuda, needs_ptxas
from tests.ops.philox_kernels import philox_randn_f64



def cosine_tables(T=1000):
    """sqrt(abar_t), sqrt(1 - abar_t) of the cosine schedule, float64 (T,)."""
    s = torch.arange(T + 1, dtype=torch.float64) / T
    ab = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    acp = torch.cumprod(1 - torch.clamp(1 - ab[1:] / ab[:-1], max=0.999), 0)
    return acp.sqrt(), (1 - acp).sqrt()


SAB, S1MAB = cosine_tables()
M64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def splitmix64_reference(x: int) -> int:
    """splitmix64's finaliser on Python ints."""
    z = x & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _inputs(M, C, dtype=torch.float32, seed=0, width=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, width or C, generator=g).to(DEVICE, dtype)[:, :C]
    t = torch.randint(0, 1000, (M,), generator=g)
    t[0], t[-1] = 0, 999  # both ends of the schedule
    seeds = DN.row_seeds(torch.tensor([seed, seed + 1], dtype=torch.int64), (M + 1) // 2)[:M]
    return x, t.to(DEVICE), seeds.to(DEVICE)


# ----------------------------------------------------------------------------- row seeds
def _python_row_seed(s, i):
    a = splitmix64_reference((s + GAMMA) & M64)
    h = splitmix64_reference((a + (i + 1) * GAMMA) & M64)
    return h - (1 << 64) if h >= 1 << 63 else h


def test_row_seeds_match_python_ints():
    samples = [0, 1, -1, 2 ** 63 - 1, -2 ** 63, 987654321987654321, -5]
    got = DN.row_seeds(torch.tensor(samples, dtype=torch.int64), 7)
    assert got.dtype == torch.int64 and got.shape == (len(samples) * 7,)
    assert got.tolist() == [_python_row_seed(s, i) for s in samples for i in range(7)]


def test_mix64_matches_python_ints():
    g = torch.Generator().manual_seed(3)
    v = torch.randint(-2 ** 63, 2 ** 63 - 1, (500,), generator=g, dtype=torch.int64)
    v = torch.cat([v, torch.tensor([0, 1, -1, 2 ** 63 - 1, -2 ** 63])])
    got = DN._join64(*DN._mix64(DN._split64(v))).tolist()
    for x, y in zip(v.tolist(), got):
        assert (y & M64) == splitmix64_reference(x & M64)


def test_row_seeds_distinct_and_follow_the_sample():
    B, R = 64, 4096
    samples = torch.arange(B, dtype=torch.int64)  # adjacent sample seeds: the hard case
    s = DN.row_seeds(samples, R)
    assert s.unique().numel() == B * R
    # a sample's row seeds do not depend on the other samples of the batch, their order, or R
    assert torch.equal(DN.row_seeds(samples[5:6], R), s[5 * R:6 * R])
    assert torch.equal(DN.row_seeds(samples.flip(0), R).view(B, R), s.view(B, R).flip(0))
    assert torch.equal(DN.row_seeds(samples, 100).view(B, 100), s.view(B, R)[:, :100])
    assert DN.row_seeds(samples, 0).numel() == 0
    # the bits are spread: each of the 64 bits is set about half the time
    bits = torch.stack([(s >> k) & 1 for k in range(64)]).double().mean(1)
    assert ((bits - 0.5).abs() < 0.01).all()


# ----------------------------------------------------------------------------- q_sample
def q_sample_truth(seeds):
    def truth(x, t, sab, s1mab):
        eps = philox_randn_f64(seeds, x.shape[1]).to(x.device)
        t = t.to(sab.device)
        return sab[t][:, None].to(x.device) * x + s1mab[t][:, None].to(x.device) * eps
    return truth


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M,C,width", [(37, 588, None), (19, 5, None), (7, 588, 1176)])
def test_q_sample(M, C, width, dtype):
    x, t, seeds = _inputs(M, C, dtype=dtype, width=width)
    out, _ = check_op(lambda x, t, a, b: DN.q_sample(x, t, seeds, a, b),
                      lambda x, t, a, b: DN.q_sample_reference(x, t, seeds, a, b),
                      [x, t, SAB, S1MAB], truth=q_sample_truth(seeds), what=f"q_sample {M}x{C}")
    assert out.shape == (M, C) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(DN.q_sample(x, t, seeds, SAB.float(), S1MAB.float()), out)  # coefficients gathered in fp32


def test_q_sample_uses_the_noise_it_claims():
    """x_t = a x + b eps: at t with a tiny a, (x_t - a x) / b recovers eps."""
    M, C = 8, 33
    x, _, seeds = _inputs(M, C)
    t = torch.full((M,), 999, device=DEVICE)
    xt = DN.q_sample(x, t, seeds, SAB, S1MAB)
    a, b = SAB[999].item(), S1MAB[999].item()
    torch.testing.assert_close((xt - a * x) / b, philox_randn_reference(seeds, C), atol=1e-5, rtol=1e-5)


def test_kernels_build_no_noise_tensor(monkeypatch):
    """The kernel path never materialises eps (through the reference), forward or backward."""
    monkeypatch.setattr(DN, "philox_randn_reference", NoLaunch())
    x, t, seeds = _inputs(7, 40)
    DN.q_sample(x, t, seeds, SAB, S1MAB)
    e = torch.randn(7, 80, device=DEVICE, requires_grad=True)
    DN.eps_mse(e[:, :40], seeds).sum().backward()
    assert e.grad[:, :40].abs().sum() > 0


# ----------------------------------------------------------------------------- eps MSE
def eps_mse_truth(seeds):
    def truth(e):
        return (e - philox_randn_f64(seeds, e.shape[1]).to(e.device)).pow(2).mean(dim=1)
    return truth


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M,C,width", [(37, 588, None), (19, 5, None), (21, 588, 1176), (7, 5, 10)])
def test_eps_mse_forward_and_grad(M, C, width, dtype):
    """eps_hat as the left half of an (M, 2C) model output where ``width`` is given."""
    g = torch.Generator().manual_seed(7)
    full = torch.randn(M, width or C, generator=g).to(DEVICE, dtype).requires_grad_()
    _, _, seeds = _inputs(M, C)
    out, (grad,) = check_op(lambda f: DN.eps_mse(f[:, :C], seeds), lambda f: DN.eps_mse_reference(f[:, :C], seeds),
                            [full], truth=lambda f: eps_mse_truth(seeds)(f[:, :C]), what=f"eps_mse {M}x{C}")
    assert out.shape == (M,) and out.dtype == torch.float32 and grad.dtype == dtype
    if width:  # the gradient of the other half of the output is exactly zero
        assert (grad[:, C:] == 0).all()


def test_eps_mse_through_mean():
    """Through .mean(): an expanded, stride-0 row gradient."""
    M, C = 24, 588
    _, _, seeds = _inputs(M, C)
    out = torch.randn(M, 2 * C, device=DEVICE, requires_grad=True)
    check_op(lambda o: DN.eps_mse(o[:, :C], seeds).mean(), lambda o: DN.eps_mse_reference(o[:, :C], seeds).mean(),
             [out], truth=lambda o: eps_mse_truth(seeds)(o[:, :C]).mean(), what="mean of eps_mse")


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
def test_eps_mse_gradcheck_small():
    """Central finite differences of the kernel loss vs its analytic backward (fp32)."""
    M, C = 3, 5
    _, _, seeds = _inputs(M, C)
    e = torch.randn(M, C, device=DEVICE, requires_grad=True)
    w = torch.tensor([1.0, -0.5, 2.0], device=DEVICE)
    assert torch.autograd.gradcheck(lambda v: DN.eps_mse(v, seeds) * w, (e,), eps=1e-2, atol=2e-3, rtol=1e-2)


def test_shape_checks():
    x, t, seeds = _inputs(8, 5)
    with pytest.raises(ValueError):
        DN.q_sample(x, t, seeds[:4], SAB, S1MAB)
    with pytest.raises(ValueError):
        DN.q_sample(x, t[:4], seeds, SAB, S1MAB)
    with pytest.raises(ValueError):
        DN.eps_mse(x[0], seeds)
    with pytest.raises(ValueError):
        DN.row_seeds(seeds.view(2, 4), 3)


def test_gpu_tiles_in_interpreter(monkeypatch):
    """The GPU's 4 x 128 tiles for C = 588: five column blocks per row tile, the last one masked."""
    monkeypatch.setattr(launch, "gpu_tiles", lambda device: True)
    plan = DN.philox_config(19, 588, torch.float32, launch.target(torch.device("cpu")))
    assert plan == launch.Launch.of((5,), 4, BLOCK_M=4, BLOCK_C=128)
    x, t, seeds = _inputs(19, 588, width=1176)
    check_op(lambda x: DN.q_sample(x, t, seeds, SAB, S1MAB), lambda x: DN.q_sample_reference(x, t, seeds, SAB, S1MAB),
             [x], truth=lambda x: q_sample_truth(seeds)(x, t, SAB, S1MAB), what="q_sample, GPU tiles")
    full = torch.randn(19, 1176, device=DEVICE, requires_grad=True)
    check_op(lambda f: DN.eps_mse(f[:, :588], seeds), lambda f: DN.eps_mse_reference(f[:, :588], seeds), [full],
             truth=lambda f: eps_mse_truth(seeds)(f[:, :588]), what="eps_mse, GPU tiles")


# ----------------------------------------------------------------------------- dispatch
def test_cpu_without_interpreter_takes_the_references(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(DN, "_q_sample_triton", NoLaunch())
    monkeypatch.setattr(DN, "_eps_mse_fwd_triton", NoLaunch())
    x, t, seeds = (a.cpu() for a in _inputs(9, 7))
    assert torch.equal(DN.q_sample(x, t, seeds, SAB, S1MAB), DN.q_sample_reference(x, t, seeds, SAB, S1MAB))
    e = torch.randn(9, 7, requires_grad=True)
    loss = DN.eps_mse(e, seeds)
    assert loss.grad_fn is not None and "EpsMSE" not in type(loss.grad_fn).__name__
    assert torch.equal(loss, DN.eps_mse_reference(e, seeds))


def test_disabled_dispatch_takes_the_references(monkeypatch):
    monkeypatch.setattr(DN, "_q_sample_triton", NoLaunch())
    monkeypatch.setattr(DN, "_eps_mse_fwd_triton", NoLaunch())
    x, t, seeds = _inputs(9, 7)
    with dispatch.override(fused=False):
        assert torch.equal(DN.q_sample(x, t, seeds, SAB, S1MAB), DN.q_sample_reference(x, t, seeds, SAB, S1MAB))
        e = torch.randn(9, 7, device=DEVICE)
        assert torch.equal(DN.eps_mse(e, seeds), DN.eps_mse_reference(e, seeds))


# ----------------------------------------------------------------------------- CUDA
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_kernels_vs_reference(dtype):
    """A large batch on the GPU against the CPU reference (other log / cos implementations)."""
    M, C = 3001, 588
    x, t, seeds = (a.cpu() for a in _inputs(M, C, dtype=dtype, width=2 * C))
    dev = torch.device("cuda")
    got = DN.q_sample(x.to(dev), t.to(dev), seeds.to(dev), SAB.to(dev), S1MAB.to(dev)).cpu()
    close(got, q_sample_truth(seeds)(x.double(), t, SAB, S1MAB), DN.q_sample_reference(x, t, seeds, SAB, S1MAB),
          what="q_sample on CUDA")
    full = torch.randn(M, 2 * C).to(dtype)
    check_op(lambda f: DN.eps_mse(f.to(dev)[:, :C], seeds.to(dev)).cpu(),
             lambda f: DN.eps_mse_reference(f[:, :C], seeds), [full.requires_grad_()],
             truth=lambda f: eps_mse_truth(seeds)(f[:, :C]), what="eps_mse on CUDA")


# ----------------------------------------------------------------------------- compiled for sm_90
_AOT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ivfast.ops import diffusion_noise as DN, launch
from tests.ops import philox_kernels as PK

def build(fn, sig, const, warps):
    sig = dict(sig, **{k: "constexpr" for k in const})
    k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps})
    assert k.asm["cubin"], fn.__name__
    print("KERNEL", fn.__name__, sig.get("x_ptr", sig.get("e_ptr", "")), flush=True)

for C in (588,):
    bm, bc, w = launch.column_loop_tile(52224, C, gpu=True)
    blocks = {"BLOCK_M": bm, "BLOCK_C": bc}
    for dt in ("bf16", "fp32"):
        build(DN._q_sample_kernel, {"x_ptr": "*" + dt, "t_ptr": "*i64", "seeds_ptr": "*i64", "a_ptr": "*fp64",
              "b_ptr": "*fp64", "out_ptr": "*" + dt, "M": "i32", "C": "i32", "T": "i32", "stride_xm": "i32",
              "stride_xc": "i32", "stride_om": "i32"}, blocks, w)
        build(DN._eps_mse_fwd_kernel, {"e_ptr": "*" + dt, "seeds_ptr": "*i64", "out_ptr": "*fp32", "M": "i32",
              "C": "i32", "stride_em": "i32", "stride_ec": "i32"}, blocks, w)
        build(DN._eps_mse_bwd_kernel, {"e_ptr": "*" + dt, "seeds_ptr": "*i64", "g_ptr": "*fp32",
              "grad_ptr": "*" + dt, "M": "i32", "C": "i32", "stride_em": "i32", "stride_ec": "i32",
              "stride_g": "i32", "stride_gm": "i32"}, blocks, w)
build(PK._philox_rows_kernel, {"seeds_ptr": "*i64", "out_ptr": "*fp32", "M": "i32", "N": "i32",
      "stride_om": "i32"}, {"WHAT": 0, "BLOCK_M": 8, "BLOCK_N": 256}, 4)
"""


@needs_ptxas
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """The compiled (not interpreted) kernels build for an H100 (sm_90) with Triton's own ptxas,
    at the block sizes the GPU heuristic picks, and ptxas reports no register spills."""
    res = compiled_python(_AOT, timeout=300, TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1",
                          TRITON_CACHE_DIR=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("KERNEL") == 7
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", res.stdout)]
    assert len(spills) == 7 and max(spills) == 0, res.stdout[-3000:]
