"""Attention backends, TFLOP/s on the shapes ivfast runs (bf16, head dim 64).

    pytest benchmarks/bench_attention.py --benchmark-enable

GPU: the real shapes (encoder 16 x 836 tokens x 12 heads, also as a varlen batch of 16
sequences of different lengths; predictor 16 x 4100 tokens x 16 heads, window 64 and
global; teacher 256 frames x 256 patches x 16 heads; IVFAST_BENCH_SHAPES=paper: all but the
varlen case), forward and forward+backward, timed with ``harness.gpu_time_ms``; the table goes
to ``benchmarks/results`` via ``harness.write_results``. CPU: small shapes that only prove the harness runs; nothing is
written. A backend that cannot serve a case here (flash-attn not installed, FlexAttention
backward on the CPU, math too large) is skipped with the reason, never measured through a
fallback. FLOPs count only the (query, key) pairs inside the window (and inside each
sequence for varlen): 4 * H * pairs * Dh forward, 3.5 times that forward+backward.
"""
from __future__ import annotations

import time

import pytest
import torch

from benchmarks.harness import bench_device, gpu_time_ms, on_gpu, pick_shapes, shape_set, write_results
from ivfast.ops import attention as A

HEAD_DIM = 64
DTYPE = torch.bfloat16
MATH_MAX_SCORE_BYTES = 4 << 30  # the math reference materialises fp32 scores; skip it beyond this

# name, batch, heads, tokens, window (half width), varlen lengths
GPU_CASES = [
    ("encoder", 16, 12, 836, None, None),
    ("encoder-varlen", 16, 12, None, None, [836 + 17 * (i - 8) for i in range(16)]),
    ("predictor-local", 16, 16, 4100, 64, None),
    ("predictor-global", 16, 16, 4100, None, None),
    ("teacher", 256, 16, 256, None, None),
]
CPU_CASES = [
    ("encoder", 2, 2, 96, None, None),
    ("encoder-varlen", 3, 2, None, None, [40, 96, 61]),
    ("predictor-local", 2, 2, 160, 8, None),
    ("predictor-global", 2, 2, 160, None, None),
    ("teacher", 8, 2, 64, None, None),
]
CASES = pick_shapes("attention", gpu=GPU_CASES, cpu=CPU_CASES, paper=[c for c in GPU_CASES if c[0] != "encoder-varlen"])
BACKENDS = ["flash", "flex", "sdpa", "math"]
MODES = ["fwd", "fwd+bwd"]

_rows: list[dict] = []


def _pairs(n: int, window: int | None) -> int:
    if window is None or window >= n - 1:
        return n * n
    return sum(min(n - 1, i + window) - max(0, i - window) + 1 for i in range(n))


def _inputs(batch, heads, n, lengths, grad, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    if lengths is None:
        shape = (batch, heads, n, HEAD_DIM)
        cu = None
    else:
        shape = (sum(lengths), heads, HEAD_DIM)
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    q, k, v = (torch.randn(shape, generator=g).to(device=device, dtype=DTYPE).requires_grad_(grad) for _ in range(3))
    return q, k, v, cu


@pytest.fixture(scope="module", autouse=True)
def _write_table():
    yield
    if on_gpu() and _rows:
        config = {"dtype": str(DTYPE).replace("torch.", ""), "head_dim": HEAD_DIM, "shapes": shape_set(),
                  "timing": "triton do_bench median",
                  "flops": "4*H*pairs*Dh fwd (pairs inside window / sequence), x3.5 fwd+bwd",
                  "cases": [dict(zip(("name", "batch", "heads", "tokens", "window", "lengths"), c)) for c in CASES],
                  "attention": A.describe_backend()}
        path = write_results("attention", config, _rows)
        print(f"\nattention benchmark written to {path}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_attention_throughput(benchmark, case, backend, mode):
    name, batch, heads, n, window, lengths = case
    device = bench_device()
    grad = mode == "fwd+bwd"
    q, k, v, cu = _inputs(batch, heads, n, lengths, grad, device)
    kw = dict(window=window, cu_seqlens=cu, max_seqlen=max(lengths) if lengths else None)
    with torch.set_grad_enabled(grad):
        chosen, why = A.resolve_backend(q, k, v, backend=backend, explain=True, **kw)
    if chosen != backend:
        pytest.skip(f"'{backend}' cannot serve this case here ({why[0][1]})")
    longest = max(lengths) if lengths else n
    if backend == "math" and batch * heads * longest * longest * 4 > MATH_MAX_SCORE_BYTES and lengths is None:
        pytest.skip("math reference: the fp32 score matrix is too large for this shape")

    def fwd():
        return A.attention(q, k, v, backend=backend, **kw)

    if grad:
        dout = torch.randn_like(q)

        def step():
            return torch.autograd.grad(fwd(), (q, k, v), dout)
    else:
        def step():
            with torch.no_grad():
                return fwd()

    pairs = sum(_pairs(n_i, window) for n_i in lengths) if lengths else batch * _pairs(n, window)
    flops = 4 * heads * pairs * HEAD_DIM * (3.5 if grad else 1.0)
    if on_gpu():
        ms = gpu_time_ms(step)
        benchmark.extra_info.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
        benchmark.pedantic(lambda: (step(), torch.cuda.synchronize()), rounds=3, iterations=1, warmup_rounds=1)
    else:
        t0 = time.perf_counter()
        out = benchmark(step)
        ms = (time.perf_counter() - t0) * 1e3  # the harness check only: not a measurement
        first = out[0] if isinstance(out, tuple) else out
        assert torch.isfinite(first.float()).all()
    row = {"case": name, "backend": backend, "mode": mode, "batch": batch, "heads": heads,
           "tokens": n if n is not None else f"varlen {min(lengths)}-{max(lengths)}",
           "window": window if window is not None else "global", "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}
    _rows.append(row)
