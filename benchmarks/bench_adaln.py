"""Benchmark: the fused adaLN block and final layer (ivfast.ops.adaln) against eager PyTorch and
torch.compile.

Scopes: one adaLN residual block, and the head's adaLN stack (``depth`` blocks and the final layer,
SiLU of the condition computed once; the head's input and condition embeddings are plain Linears,
the same for every implementation, and are left out). Modes: forward (with autograd recording, as
in training), backward (the graph is built in an untimed setup), full (forward + backward).
Implementations:

- ``eager_fp32``: the references (``adaln_block_ref`` / ``adaln_final_ref``) in float32 (how the
  release runs the head),
- ``eager_bf16``: the references in bfloat16,
- ``compile_bf16``: ``torch.compile`` of the bfloat16 references (on a CPU only with
  IVFAST_BENCH_COMPILE=1, see ``harness.skip_unavailable``),
- ``fused_bf16`` / ``fused_fp32``: ``adaln_block`` / ``adaln_final``.

Also recorded: bytes kept for backward per row of each implementation (distinct storages of the
tensors saved for backward, via ``torch.autograd.graph.saved_tensors_hooks``; on a GPU also the
allocator's growth over the forward) and, on a GPU, the achieved GB/s of every memory-bound
kernel against ``harness.copy_bandwidth_gbs()``.

Shapes: GPU the real head (52,224 rows x 1536, depth 6, out 1176); CPU small (128 rows x 128,
depth 2: a smoke run; CPU numbers say nothing about the GPU). On the CPU the fused kernels run
through Triton's interpreter only with ``TRITON_INTERPRET=1`` set, else the fused impl runs the
references (``fused_backend`` in the results says which).

Run:  python benchmarks/bench_adaln.py [pytest args]
  or  python -m pytest benchmarks/bench_adaln.py -o python_files='bench_*.py' --benchmark-enable
Results: benchmarks/results/adaln*-{gpu,cpu}-<date>.{json,md} via ``harness.write_results``.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402
from ivfast.memory.saved_tensors import saved_bytes  # noqa: E402
from ivfast.ops import adaln  # noqa: E402
from ivfast.ops.dispatch import interpreting, use_triton  # noqa: E402

GPU = harness.on_gpu()
DEV = harness.bench_device()
_PAPER = dict(rows=52224, width=1536, depth=6, out_channels=1176)  # the head of the paper's configs, B and L alike
SHAPE = harness.pick_shapes("adaln", gpu=[_PAPER], paper=[_PAPER],
                            cpu=[dict(rows=64 if interpreting() else 128, width=128, depth=2, out_channels=96)])[0]
ROUNDS, WARMUP = (20, 3) if GPU else (3, 1)

SCOPES = ["block", "head"]
IMPLS = ["eager_fp32", "eager_bf16", "compile_bf16", "fused_bf16", "fused_fp32"]
MODES = ["forward", "backward", "full"]
EPS = 1e-6

_RESULTS = {"adaln": [], "adaln_saved": [], "adaln_kernels": []}


def _fused_backend(t: torch.Tensor) -> str:
    if not use_triton(t):
        return "reference"
    return "triton-interpreter" if t.device.type == "cpu" else "triton"


def _sync():
    if GPU:
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- implementations
def _params(scope: str, dtype: torch.dtype):
    """Non-zero parameters (the real init zeroes adaLN and the output layer) for every block of the
    scope, then the final layer's for the head: lists of (ada_w, ada_b, ln_w, ln_b, w1, b1, w2, b2)
    and (ada_w, ada_b, lin_w, lin_b)."""
    n, g = SHAPE["width"], torch.Generator(device="cpu").manual_seed(0)

    def p(*shape, std=None, mean=0.0):
        std = shape[-1] ** -0.5 if std is None else std
        return (torch.randn(*shape, generator=g) * std + mean).to(DEV, dtype).requires_grad_()

    blocks = [(p(3 * n, n), p(3 * n, std=0.1), p(n, std=0.1, mean=1.0), p(n, std=0.1), p(n, n), p(n, std=0.1),
               p(n, n), p(n, std=0.1)) for _ in range(1 if scope == "block" else SHAPE["depth"])]
    final = (p(2 * n, n), p(2 * n, std=0.1), p(SHAPE["out_channels"], n), p(SHAPE["out_channels"], std=0.1))
    return blocks, (final if scope == "head" else None)


def _forward_fn(fused: bool):
    block = adaln.adaln_block if fused else adaln.adaln_block_ref
    final_layer = adaln.adaln_final if fused else adaln.adaln_final_ref

    def forward(x, y, blocks, final):
        silu_y = F.silu(y)  # once for all blocks
        for ps in blocks:
            x = block(x, silu_y, *ps, EPS)
        return x if final is None else final_layer(x, silu_y, *final, EPS)

    return forward


_BUILT = {}


def _build(scope: str, impl: str):
    """(parameters, make_inputs() -> (tensors requiring grad, call args), call(args)) cached."""
    key = (scope, impl)
    if key in _BUILT:
        return _BUILT[key]
    dtype = torch.float32 if impl.endswith("fp32") else torch.bfloat16
    blocks, final = _params(scope, dtype)
    params = [p for ps in blocks + ([final] if final else []) for p in ps]
    g = torch.Generator(device="cpu").manual_seed(1)
    M, n = SHAPE["rows"], SHAPE["width"]
    data = [torch.randn(M, n, generator=g).to(DEV, dtype), torch.randn(M, n, generator=g).to(DEV, dtype)]

    def make_inputs():  # residual stream and condition both carry gradients
        x, y = (d.detach().clone().requires_grad_() for d in data)
        return [x, y], (x, y)

    forward = _forward_fn(impl.startswith("fused"))
    runner = torch.compile(forward) if impl.startswith("compile") else forward

    def call(args):
        return runner(*args, blocks, final)

    _BUILT[key] = (params, make_inputs, call)
    return _BUILT[key]


def _gout(out):
    g = torch.Generator(device="cpu").manual_seed(2)
    return torch.randn(out.shape, generator=g).to(out.device, out.dtype)


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    config = dict(SHAPE, device=str(DEV), rounds=ROUNDS, warmup=WARMUP, interpret=interpreting())
    for name, rows in _RESULTS.items():
        if rows:
            print("results:", harness.write_results(name, config, rows))


# --------------------------------------------------------------------------- timings
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scope", SCOPES)
def test_adaln_time(benchmark, scope, impl, mode):
    harness.skip_unavailable(impl.split("_")[0])
    params, make_inputs, call = _build(scope, impl)
    state = {}

    def setup():
        for p in params:
            p.grad = None
        leaves, args = make_inputs()
        state["leaves"] = leaves
        if mode == "backward":
            out = call(args)
            state["out"], state["g"] = out, _gout(out)
        else:
            state["args"] = args
        _sync()
        return (), {}

    def forward():
        call(state["args"])
        _sync()

    def backward():
        state["out"].backward(state["g"])
        _sync()

    def full():
        out = call(state["args"])
        out.backward(_gout(out))
        _sync()

    fn = {"forward": forward, "backward": backward, "full": full}[mode]
    try:
        for _ in range(WARMUP):  # includes torch.compile's compilation
            setup()
            fn()
    except Exception as e:  # torch.compile's CPU backend fails on some bf16 graphs
        if not impl.startswith("compile"):
            raise
        _RESULTS["adaln"].append(_time_row(scope, impl, mode, None, None, "-",
                                           error=f"{type(e).__name__}"))
        pytest.skip(f"torch.compile failed here: {type(e).__name__}: {str(e)[:200]}")
    benchmark.group = f"{scope}-{mode}"
    benchmark.extra_info.update(scope=scope, impl=impl, mode=mode)
    benchmark.pedantic(fn, setup=setup, rounds=ROUNDS, iterations=1)
    stats = getattr(benchmark, "stats", None)
    med = stats.stats.median * 1e3 if stats is not None else None
    mean = stats.stats.mean * 1e3 if stats is not None else None
    _RESULTS["adaln"].append(_time_row(scope, impl, mode, med, mean, _backend(impl, state)))


def _backend(impl, state):
    probe = state.get("leaves", [torch.zeros(1, device=DEV)])[0]
    return _fused_backend(probe) if impl.startswith("fused") else "-"


def _time_row(scope, impl, mode, med, mean, backend, error=None):
    return dict(scope=scope, impl=impl, mode=mode, rows=SHAPE["rows"], width=SHAPE["width"],
                depth=SHAPE["depth"] if scope == "head" else 1, median_ms=med, mean_ms=mean,
                fused_backend=backend, error=error)


# --------------------------------------------------------------------------- saved bytes
def _saved_storage_bytes(fn, params):
    saved, out = saved_bytes(fn, params=params)
    return saved.total, saved.tensors, out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scope", SCOPES)
def test_adaln_saved_bytes(scope, impl):
    harness.skip_unavailable(impl.split("_")[0])
    params, make_inputs, call = _build(scope, impl)
    leaves, args = make_inputs()
    call(args)  # compile outside the measurement
    _sync()
    leaves, args = make_inputs()
    out = None
    try:
        storage, tensors, out = _saved_storage_bytes(lambda: call(args), params)
    except Exception as e:  # e.g. a compiled graph refusing the hooks
        storage = tensors = None
        print(f"saved-tensor hooks failed for {impl}: {e!r}")
    del out
    retained = None
    if GPU:  # allocator growth over a forward, the output excluded
        _, args = make_inputs()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = call(args)
        torch.cuda.synchronize()
        retained = (torch.cuda.memory_allocated() - before - out.untyped_storage().nbytes())
        del out
    M = SHAPE["rows"]
    _RESULTS["adaln_saved"].append(dict(
        scope=scope, impl=impl, rows=M, width=SHAPE["width"],
        fused_backend=_backend(impl, {"leaves": leaves}),
        saved_storage_bytes_per_row=None if storage is None else storage / M,
        saved_tensor_bytes_per_row=None if tensors is None else tensors / M,
        allocator_retained_bytes_per_row=None if retained is None else retained / M,
        saved_MiB=None if storage is None else storage / 2 ** 20))


# --------------------------------------------------------------------------- kernel GB/s
@pytest.mark.skipif(not GPU, reason="kernel bandwidth needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_adaln_kernel_bandwidth(dtype):
    M, N = SHAPE["rows"], SHAPE["width"]
    e = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    x, mod, a, h, dout = r(M, N), r(M, 3 * N), r(M, N), r(M, N), r(M, N)
    w, b = r(N) + 1, r(N)
    shift, scale, gate = mod[:, :N], mod[:, N:2 * N], mod[:, 2 * N:]
    _, mean, rstd = adaln._ln_mod_fwd(x, shift, scale, w, b, 1e-6)
    d_mod = torch.empty_like(mod)
    MN = M * N
    kernels = {
        # name: (fn, bytes read + written)
        "ln_modulate_fwd": (lambda: adaln._ln_mod_fwd(x, shift, scale, w, b, 1e-6),
                            4 * MN * e + 8 * M),
        "ln_modulate_bwd (recompute, +dres, dshift, colsums)": (
            lambda: adaln._ln_mod_bwd(x, scale, dout, mean, rstd, w, b, shift=shift, dres=h,
                                      dscale=d_mod[:, N:2 * N], dshift=d_mod[:, :N], colsum=True),
            9 * MN * e + 8 * M),
        "bias_silu_fwd": (lambda: adaln._bias_silu_fwd(a, b), 2 * MN * e),
        "bias_silu_bwd (recompute)": (lambda: adaln._bias_silu_bwd(a, b, dout, recompute=True),
                                      4 * MN * e),
        "gated_residual_fwd": (lambda: adaln._gated_fwd(x, gate, h), 4 * MN * e),
        "gated_residual_bwd (colsums)": (
            lambda: adaln._gated_bwd(dout, gate, h, dgate=d_mod[:, 2 * N:], colsum=True),
            5 * MN * e),
        "eager x + gate * h (reference)": (lambda: x + gate * h, 6 * MN * e),
    }
    copy_gbs = harness.copy_bandwidth_gbs()
    for name, (fn, nbytes) in kernels.items():
        ms = harness.gpu_time_ms(fn)
        gbs = nbytes / (ms * 1e-3) / 1e9
        _RESULTS["adaln_kernels"].append(dict(
            kernel=name, dtype=str(dtype).replace("torch.", ""), rows=M, width=N, ms=ms,
            GB=nbytes / 1e9, GBps=gbs, copy_GBps=copy_gbs, pct_of_copy=100 * gbs / copy_gbs))


if __name__ == "__main__":
    sys.exit(pytest.main([os.path.abspath(__file__), "-o", "python_files=bench_*.py",
                          "--benchmark-enable", "-q", "-p", "no:cacheprovider"] + sys.argv[1:]))
