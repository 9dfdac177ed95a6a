"""kernels/diffusion_noise.py: q_sample and eps-MSE with Philox noise drawn in the kernel.

Interpreter tests (TRITON_INTERPRET=1, set here before triton is imported) compare the
fused kernels with the PyTorch references and with the engine's GaussianDiffusion. CUDA
tests run with TRITON_INTERPRET=0 on a GPU machine.

Tolerances: eps from the kernel and from ``philox_randn_reference`` differ by at most an ulp
of log / cos (~4e-7 absolute), so fp32 results agree to ~1e-6. bf16 outputs are rounded
once from fp32; the interpreter truncates fp32 -> bf16 where torch rounds to nearest, so
bf16 comparisons allow one bf16 ulp (2^-7 relative) plus the engine's own bf16 arithmetic.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ivfast.models.diffusion import GaussianDiffusion  # noqa: E402
from kernels import diffusion_noise as DN  # noqa: E402
from kernels import dispatch  # noqa: E402
from kernels.philox import philox_randn_reference  # noqa: E402

interp = pytest.mark.skipif(not dispatch.interpreting(), reason="needs TRITON_INTERPRET=1")
cuda = pytest.mark.skipif(dispatch.interpreting() or not torch.cuda.is_available(),
                          reason="needs a GPU and TRITON_INTERPRET=0")

DIFF = GaussianDiffusion(1000, "cosine")
SAB, S1MAB = DIFF.sqrt_alphas_cumprod, DIFF.sqrt_one_minus_alphas_cumprod
M64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def _inputs(M, C, dtype=torch.float32, seed=0, width=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, width or C, generator=g).to(dtype)[:, :C]
    t = torch.randint(0, 1000, (M,), generator=g)
    t[0], t[-1] = 0, 999  # both ends of the schedule
    seeds = DN.row_seeds(torch.tensor([seed, seed + 1], dtype=torch.int64), (M + 1) // 2)[:M]
    return x, t, seeds


def _no_reference_noise(monkeypatch):
    """Make the fused path fail if it ever materialises eps through the reference."""
    def boom(*a, **k):
        raise AssertionError("the fused path must not build an eps tensor")

    monkeypatch.setattr(DN, "philox_randn_reference", boom)


# ----------------------------------------------------------------------------- row seeds
def _python_row_seed(s, i):
    a = DN.splitmix64_reference((s + GAMMA) & M64)
    h = DN.splitmix64_reference((a + (i + 1) * GAMMA) & M64)
    return h - (1 << 64) if h >= 1 << 63 else h


def test_row_seeds_match_python_ints():
    samples = [0, 1, -1, 2 ** 63 - 1, -2 ** 63, 987654321987654321, -5]
    got = DN.row_seeds(torch.tensor(samples, dtype=torch.int64), 7)
    assert got.dtype == torch.int64 and got.shape == (len(samples) * 7,)
    want = [_python_row_seed(s, i) for s in samples for i in range(7)]
    assert got.tolist() == want


def test_mix64_matches_python_ints():
    g = torch.Generator().manual_seed(3)
    v = torch.randint(-2 ** 63, 2 ** 63 - 1, (500,), generator=g, dtype=torch.int64)
    v = torch.cat([v, torch.tensor([0, 1, -1, 2 ** 63 - 1, -2 ** 63])])
    got = DN._join64(*DN._mix64(DN._split64(v))).tolist()
    for x, y in zip(v.tolist(), got):
        assert (y & M64) == DN.splitmix64_reference(x & M64)


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
@pytest.mark.parametrize("M,C", [(37, 588), (37, 5)])
def test_q_sample_reference_is_the_engine_closed_form(M, C):
    x, t, seeds = _inputs(M, C)
    ref = DN.q_sample_reference(x, t, seeds, SAB, S1MAB)
    eng = DIFF.q_sample(x, t, philox_randn_reference(seeds, C))
    assert torch.equal(ref, eng)


@interp
@pytest.mark.parametrize("M,C,width", [(37, 588, None), (37, 5, None), (19, 588, 1176)])
def test_q_sample_fused_fp32(M, C, width, monkeypatch):
    x, t, seeds = _inputs(M, C, width=width)
    ref = DN.q_sample_reference(x, t, seeds, SAB, S1MAB)
    eng = DIFF.q_sample(x, t, philox_randn_reference(seeds, C))
    _no_reference_noise(monkeypatch)
    got = DN.q_sample_fused(x, t, seeds, SAB, S1MAB)
    assert got.shape == (M, C) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, eng, atol=1e-6, rtol=1e-6)
    # float32 tables give the same coefficients (gathered in fp32 either way)
    got32 = DN.q_sample_fused(x, t, seeds, SAB.float(), S1MAB.float())
    assert torch.equal(got32, got)


@interp
@pytest.mark.parametrize("M,C", [(37, 588), (37, 5)])
def test_q_sample_fused_bf16(M, C):
    x, t, seeds = _inputs(M, C, dtype=torch.bfloat16)
    got = DN.q_sample_fused(x, t, seeds, SAB, S1MAB)
    assert got.dtype == torch.bfloat16
    ref = DN.q_sample_reference(x, t, seeds, SAB, S1MAB)
    torch.testing.assert_close(got.float(), ref.float(), atol=1e-2, rtol=1e-2)
    # vs the exact fp32 value: one bf16 rounding (the interpreter truncates: < 2^-7 relative)
    exact = DN.q_sample_reference(x.float(), t, seeds, SAB, S1MAB)
    assert ((got.float() - exact).abs() <= exact.abs() * 2 ** -7 + 1e-6).all()
    # vs the engine, which does the arithmetic in bf16 itself
    eng = DIFF.q_sample(x, t, philox_randn_reference(seeds, C).to(torch.bfloat16))
    torch.testing.assert_close(got.float(), eng.float(), atol=3e-2, rtol=3e-2)


def test_q_sample_uses_the_noise_it_claims():
    """x_t = a x + b eps: at t with a tiny a, (x_t - a x) / b recovers eps."""
    M, C = 8, 33
    x, _, seeds = _inputs(M, C)
    t = torch.full((M,), 999)
    xt = DN.q_sample_fused(x, t, seeds, SAB, S1MAB)
    a, b = SAB[999].item(), S1MAB[999].item()
    torch.testing.assert_close((xt - a * x) / b, philox_randn_reference(seeds, C), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- eps MSE
def _grad_pair(eps_hat_full, C, seeds, weights, fused):
    leaf = eps_hat_full.detach().clone().requires_grad_(True)
    e = leaf[:, :C]
    loss_rows = (DN.eps_mse_fused if fused else DN.eps_mse_reference)(e, seeds)
    (loss_rows * weights).sum().backward()
    return loss_rows.detach(), leaf.grad


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,C,width", [(37, 588, None), (37, 5, None), (21, 588, 1176), (21, 5, 10)])
def test_eps_mse_fused_forward_and_grad(M, C, width, dtype, monkeypatch):
    g = torch.Generator().manual_seed(7)
    full = torch.randn(M, width or C, generator=g).to(dtype)
    _, _, seeds = _inputs(M, C)
    w = torch.rand(M, generator=g) + 0.5
    ref_l, ref_g = _grad_pair(full, C, seeds, w, fused=False)
    _no_reference_noise(monkeypatch)
    got_l, got_g = _grad_pair(full, C, seeds, w, fused=True)
    assert got_l.shape == (M,) and got_l.dtype == torch.float32
    assert got_g.dtype == dtype and got_g.shape == full.shape
    torch.testing.assert_close(got_l, ref_l, atol=1e-6, rtol=1e-5)
    if width:  # the gradient of the other half of the (M, 2C) output is exactly zero
        assert (got_g[:, C:] == 0).all()
    if dtype == torch.float32:
        torch.testing.assert_close(got_g, ref_g, atol=1e-7, rtol=1e-5)
    else:  # one bf16 rounding of the same fp32 value (truncation in the interpreter)
        torch.testing.assert_close(got_g.float(), ref_g.float(), atol=1e-6, rtol=2 ** -7)


@interp
def test_eps_mse_fused_mean_backward_and_engine_loss():
    """Through .mean() (an expanded, stride-0 grad) and vs GaussianDiffusion.training_losses."""
    M, C = 24, 588
    x, t, seeds = _inputs(M, C)
    out = torch.randn(M, 2 * C, requires_grad=True)
    loss = DN.eps_mse_fused(out[:, :C], seeds).mean()
    loss.backward()
    eps = philox_randn_reference(seeds, C)
    out2 = out.detach().clone().requires_grad_(True)
    diff = GaussianDiffusion(1000, "cosine", learn_sigma=True)
    x_t = DN.q_sample_reference(x, t, seeds, SAB, S1MAB)
    ref = diff.training_losses(out2, x, x_t, t, eps)["mse"].mean()
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.grad, out2.grad, atol=1e-8, rtol=1e-5)


@interp
@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
def test_eps_mse_gradcheck_small():
    """Central finite differences of the fused loss vs its analytic backward (fp32)."""
    M, C = 3, 5
    _, _, seeds = _inputs(M, C)
    e = torch.randn(M, C, requires_grad=True)
    w = torch.tensor([1.0, -0.5, 2.0])
    assert torch.autograd.gradcheck(lambda v: DN.eps_mse_fused(v, seeds) * w, (e,),
                                    eps=1e-2, atol=2e-3, rtol=1e-2)


def test_eps_mse_reference_is_the_engine_mse():
    M, C = 16, 12
    x, t, seeds = _inputs(M, C)
    out = torch.randn(M, C)
    eps = philox_randn_reference(seeds, C)
    mse = DIFF.training_losses(out, x, DIFF.q_sample(x, t, eps), t, eps)["mse"]
    torch.testing.assert_close(DN.eps_mse_reference(out, seeds), mse, atol=0, rtol=0)


def test_shape_checks():
    x, t, seeds = _inputs(8, 5)
    with pytest.raises(ValueError):
        DN.q_sample_fused(x, t, seeds[:4], SAB, S1MAB)
    with pytest.raises(ValueError):
        DN.q_sample_fused(x, t[:4], seeds, SAB, S1MAB)
    with pytest.raises(ValueError):
        DN.eps_mse_fused(x[0], seeds)
    with pytest.raises(ValueError):
        DN.row_seeds(seeds.view(2, 4), 3)


# ----------------------------------------------------------------------------- dispatch
def test_dispatch_cpu_without_interpreter_takes_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def boom(*a, **k):
        raise AssertionError("the kernel must not run")

    monkeypatch.setattr(DN, "_q_sample_triton", boom)
    monkeypatch.setattr(DN, "_eps_mse_fwd_triton", boom)
    x, t, seeds = _inputs(9, 7)
    assert torch.equal(DN.q_sample_fused(x, t, seeds, SAB, S1MAB),
                       DN.q_sample_reference(x, t, seeds, SAB, S1MAB))
    e = torch.randn(9, 7, requires_grad=True)
    l = DN.eps_mse_fused(e, seeds)
    assert l.grad_fn is not None and "EpsMSE" not in type(l.grad_fn).__name__
    assert torch.equal(l, DN.eps_mse_reference(e, seeds))


def test_dispatch_disabled_takes_reference(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the kernel must not run")

    monkeypatch.setattr(DN, "_q_sample_triton", boom)
    monkeypatch.setattr(DN, "_eps_mse_fwd_triton", boom)
    monkeypatch.setattr(dispatch, "_enabled", False)
    x, t, seeds = _inputs(9, 7)
    assert torch.equal(DN.q_sample_fused(x, t, seeds, SAB, S1MAB),
                       DN.q_sample_reference(x, t, seeds, SAB, S1MAB))
    e = torch.randn(9, 7)
    assert torch.equal(DN.eps_mse_fused(e, seeds), DN.eps_mse_reference(e, seeds))


# ----------------------------------------------------------------------------- CUDA
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_vs_reference(dtype):
    M, C = 3001, 588
    x, t, seeds = _inputs(M, C, dtype=dtype, width=2 * C)
    dev = torch.device("cuda")
    xc, tc, sc = x.to(dev), t.to(dev), seeds.to(dev)
    got = DN.q_sample_fused(xc, tc, sc, SAB.to(dev), S1MAB.to(dev)).cpu()
    ref = DN.q_sample_reference(x, t, seeds, SAB, S1MAB)
    tol = dict(atol=4e-6, rtol=4e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got.float(), ref.float(), **tol)
    full = torch.randn(M, 2 * C).to(dtype)
    w = torch.rand(M) + 0.5
    ref_l, ref_g = _grad_pair(full, C, seeds, w, fused=False)
    got_l, got_g = _grad_pair(full.to(dev), C, sc, w.to(dev), fused=True)
    torch.testing.assert_close(got_l.cpu(), ref_l, atol=1e-6, rtol=1e-5)
    gtol = dict(atol=1e-7, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-6, rtol=2 ** -7)
    torch.testing.assert_close(got_g.cpu().float(), ref_g.float(), **gtol)


# ----------------------------------------------------------------------------- compiled for sm_90
_AOT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import diffusion_noise as DN, philox as P
from kernels.philox import row_block_sizes

def build(fn, sig, const, warps):
    sig = dict(sig, **{k: "constexpr" for k in const})
    k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps})
    assert k.asm["cubin"], fn.__name__
    print("KERNEL", fn.__name__, sig.get("x_ptr", sig.get("e_ptr", "")), flush=True)

for C in (588,):
    bm, bc, w = row_block_sizes(52224, C, on_gpu=True)
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
build(P._philox_rows_kernel, {"seeds_ptr": "*i64", "out_ptr": "*fp32", "M": "i32", "N": "i32",
      "stride_om": "i32"}, {"WHAT": 0, "BLOCK_M": 8, "BLOCK_N": 256}, 4)
"""


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """The compiled (not interpreted) kernels build for an H100 (sm_90) with Triton's own ptxas,
    at the block sizes the GPU heuristic picks, and ptxas reports no register spills."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        if not os.path.exists(get_ptxas(90).path):
            pytest.skip("no ptxas in this triton install")
    except Exception as e:  # pragma: no cover
        pytest.skip(f"triton's NVIDIA backend unavailable: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1", TRITON_CACHE_DIR=str(tmp_path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _AOT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("KERNEL") == 7
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", res.stdout)]
    assert len(spills) == 7 and max(spills) == 0, res.stdout[-3000:]
