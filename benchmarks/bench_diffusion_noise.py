"""Benchmark: diffusion noise drawn in the kernel (ivfast.ops.diffusion_noise) vs the release's way.

Run (not part of ``make test``)::

    pytest benchmarks/bench_diffusion_noise.py --benchmark-enable -q

Work measured, on the diffusion head's rows (M tokens x C = 588 channels; eps_hat is the left
half of an (M, 2C) model output, as with learn_sigma):

- forward: x_t = q_sample(x, t, eps) and the per-row loss mean_c (eps_hat - eps)^2;
- backward: d loss / d eps_hat (through autograd, graph kept);
- full: forward then backward.

Implementations:

- ``eager``: the release's way: eps = torch.randn_like(x) materialised, then
  GaussianDiffusion.q_sample and the mse of GaussianDiffusion.training_losses;
- ``compile``: torch.compile of the same function;
- ``fused``: q_sample + eps_mse (eps regenerated from Philox, never stored),
  with the per-row seeds computed beforehand (their cost is its own row, ``row_seeds``).

Shapes: GPU, the real one (16 clips x 3264 masked tokens = 52,224 rows x 588) in bf16 and
fp32; CPU, a small one (the references or the interpreter, whichever dispatch picks; the
point there is only that the benchmark runs). On GPU each row records the median time
(triton's do_bench), the essential bytes (what the fused kernels must move: forward reads x
and eps_hat and writes x_t; backward reads eps_hat and writes its gradient), the achieved
GB/s over those bytes and its share of the measured copy bandwidth, and the memory the
autograd graph holds after the forward (the eps tensor the fused path never stores is
``eps_bytes``). Results: benchmarks/results/diffusion_noise-<device>-<date>.{json,md}.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks import harness
from ivfast.models.diffusion import GaussianDiffusion
from ivfast.ops import diffusion_noise as DN
from ivfast.ops.diffusion_noise import eps_mse, q_sample, row_seeds

C = 588
GPU_SHAPES = [(52224, C, torch.bfloat16), (52224, C, torch.float32)]
CPU_SHAPES = [(64, C, torch.float32)]
SHAPES = harness.pick_shapes("diffusion_noise", gpu=GPU_SHAPES, cpu=CPU_SHAPES, paper=GPU_SHAPES)
MODES = ("forward", "backward", "full")
IMPLS = ("eager", "compile", "fused")
ROWS_PER_SAMPLE = 3264

_ROWS: list[dict] = []
_DIFF = GaussianDiffusion(1000, "cosine", learn_sigma=False)


def _eager(x, t, eps_hat):
    noise = torch.randn_like(x)
    x_t = _DIFF.q_sample(x, t, noise)
    mse = _DIFF.training_losses(eps_hat, x, x_t, t, noise)["mse"]
    return x_t, mse


_compiled = None


def _compiled_fn():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_eager)
    return _compiled


def _fused_factory(dev):
    sab = _DIFF.sqrt_alphas_cumprod.to(dev)
    s1mab = _DIFF.sqrt_one_minus_alphas_cumprod.to(dev)

    def fused(x, t, eps_hat, seeds):
        x_t = q_sample(x, t, seeds, sab, s1mab)
        return x_t, eps_mse(eps_hat, seeds)

    return fused


_sync = harness.sync


_time_ms = harness.time_ms


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    harness.write_kernel_results("diffusion_noise", {
        "rows_per_sample": ROWS_PER_SAMPLE,
        "channels": C,
        "eps_hat": "left half of (M, 2C)",
    }, _ROWS)


def _inputs(M, C, dtype, dev):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(M, C, generator=g).to(dev, dtype)
    t = torch.randint(0, 1000, (M,), generator=g).to(dev)
    out = torch.randn(M, 2 * C, generator=g).to(dev, dtype).requires_grad_(True)
    samples = torch.arange(-(-M // ROWS_PER_SAMPLE), dtype=torch.int64, device=dev) + 1000
    seeds = row_seeds(samples, ROWS_PER_SAMPLE)[:M].contiguous()
    return x, t, out, seeds


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-{str(s[2])[6:]}")
def test_row_seeds(benchmark, shape):
    M = shape[0]
    dev = harness.bench_device()
    samples = torch.arange(-(-M // ROWS_PER_SAMPLE), dtype=torch.int64, device=dev)

    def fn():
        row_seeds(samples, ROWS_PER_SAMPLE)
        _sync()

    benchmark(fn)
    _ROWS.append({"impl": "row_seeds", "mode": "seeds", "M": M, "C": shape[1], "dtype": str(shape[2])[6:],
                  "ms": round(_time_ms(fn), 4), "essential_bytes": None, "gbs": None,
                  "graph_bytes": None, "eps_bytes": None})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-{str(s[2])[6:]}")
def test_diffusion_noise(benchmark, shape, impl, mode):
    M, C_, dtype = shape
    dev = harness.bench_device()
    x, t, out, seeds = _inputs(M, C_, dtype, dev)
    eps_hat = out[:, :C_]
    if impl == "fused":
        f = _fused_factory(dev)
        fwd = lambda: f(x, t, eps_hat, seeds)  # noqa: E731
    elif impl == "eager":
        fwd = lambda: _eager(x, t, eps_hat)  # noqa: E731
    else:
        try:
            cf = _compiled_fn()
            cf(x, t, eps_hat)
        except Exception as e:  # no compiler toolchain, etc.
            pytest.skip(f"torch.compile unavailable here: {type(e).__name__}: {e}")
        fwd = lambda: cf(x, t, eps_hat)  # noqa: E731

    # memory held by the graph between forward and backward (outputs included)
    _sync()
    before = torch.cuda.memory_allocated() if harness.on_gpu() else None
    x_t, mse = fwd()
    loss = mse.mean()
    _sync()
    graph_bytes = torch.cuda.memory_allocated() - before if harness.on_gpu() else None

    def forward():
        fwd()
        _sync()

    def backward():
        torch.autograd.grad(loss, out, retain_graph=True)
        _sync()

    def full():
        _, m = fwd()
        torch.autograd.grad(m.mean(), out)
        _sync()

    fn = {"forward": forward, "backward": backward, "full": full}[mode]
    try:
        fn()
    except RuntimeError as e:  # e.g. a compiled graph that cannot be kept for retain_graph
        pytest.skip(f"{impl}/{mode} not measurable here: {e}")
    benchmark(fn)
    ms = _time_ms(fn)
    es = torch.empty(0, dtype=dtype).element_size()
    n = M * C_
    essential = {"forward": n * (2 * es + es), "backward": n * 2 * es, "full": n * 5 * es}[mode]
    _ROWS.append({
        "impl": impl, "mode": mode, "M": M, "C": C_, "dtype": str(dtype)[6:], "ms": round(ms, 4),
        "essential_bytes": essential, "gbs": round(essential / (ms * 1e-3) / 1e9, 1),
        "graph_bytes": graph_bytes, "eps_bytes": n * es,
    })
    del x_t, mse, loss


SWEEP = [(4, 128, 4), (2, 128, 4), (8, 128, 4), (4, 128, 8), (8, 128, 8), (8, 64, 4),
         (2, 256, 4), (4, 256, 8), (1, 512, 4), (2, 512, 8), (1, 1024, 8)]


@pytest.mark.skipif(not harness.on_gpu() or os.environ.get("IVFAST_BENCH_SWEEP") != "1",
                    reason="block-size sweep: GPU and IVFAST_BENCH_SWEEP=1 only")
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-{str(s[2])[6:]}")
def test_block_sweep(shape, monkeypatch):
    """Fused kernels under each (BLOCK_M, BLOCK_C, num_warps); rows tagged fused[bm,bc,w]."""
    M, C_, dtype = shape
    dev = harness.bench_device()
    x, t, out, seeds = _inputs(M, C_, dtype, dev)
    eps_hat = out[:, :C_]
    sab = _DIFF.sqrt_alphas_cumprod.to(dev)
    s1mab = _DIFF.sqrt_one_minus_alphas_cumprod.to(dev)
    g = torch.full((M,), 1.0 / M, device=dev)
    es = torch.empty(0, dtype=dtype).element_size()
    n = M * C_
    for cfg in SWEEP:
        monkeypatch.setattr(DN, "_blocks", lambda M, C, device, cfg=cfg: cfg)
        work = {
            "q_sample": (lambda: DN._q_sample_triton(x, t, seeds, sab, s1mab), 2 * n * es),
            "mse_fwd": (lambda: DN._eps_mse_fwd_triton(eps_hat, seeds), n * es),
            "mse_bwd": (lambda: DN._eps_mse_bwd_triton(eps_hat, seeds, g), 2 * n * es),
        }
        for name, (fn, nbytes) in work.items():
            ms = harness.gpu_time_ms(fn)
            _ROWS.append({"impl": f"fused[{cfg[0]},{cfg[1]},{cfg[2]}]", "mode": name, "M": M, "C": C_,
                          "dtype": str(dtype)[6:], "ms": round(ms, 4), "essential_bytes": nbytes,
                          "gbs": round(nbytes / (ms * 1e-3) / 1e9, 1), "graph_bytes": None,
                          "eps_bytes": None})
