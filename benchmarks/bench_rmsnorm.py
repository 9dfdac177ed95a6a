"""Benchmark: the RMSNorm kernel (ivfast.ops.rmsnorm).

Run (not part of ``make test``; pytest.ini disables benchmarks by default)::

    .venv/bin/python -m pytest benchmarks/bench_rmsnorm.py --benchmark-enable -q
    TRITON_INTERPRET=1 .venv/bin/python -m pytest benchmarks/bench_rmsnorm.py --benchmark-enable -q  # CPU + kernels

Work measured: ``y = rmsnorm(x, w)`` (the release block's norm1/norm2, and the QK-norm).

Modes: ``forward`` (no graph), ``backward`` (autograd.grad on a kept graph, gradients for
every input and the weight), ``full`` (forward + backward).

Implementations: ``eager`` (``ivfast.ops.rmsnorm.rmsnorm_ref``, the function the tests use),
``compile`` (``torch.compile`` of it), ``triton`` (``rmsnorm``; on a CPU only when
TRITON_INTERPRET=1, through the interpreter). On a CPU ``compile`` is skipped unless
IVFAST_BENCH_COMPILE=1 (compile time dwarfs these tiny shapes).

Shapes: GPU, the encoder on the visible tokens of the Stage-1 batch: 16 clips x (832
visible + 4 CLS) = 13,376 rows at widths 768 and 1024, and the full clip (16 x 4100 rows,
768), bf16 activations with an fp32 weight (IVFAST_BENCH_SHAPES=paper: the two 13,376-row
shapes). CPU: 64 rows x 96, fp32.

Essential bytes (the same for every implementation; the weight and the per-row rstd are
counted, the (#programs, D) dweight partials are not): forward reads x and writes y; backward
reads x and dy and writes dx.

On a GPU each row also records the achieved GB/s and its share of
``harness.copy_bandwidth_gbs()``. Results: benchmarks/results/rmsnorm-<gpu|cpu>-<date>.{json,md}.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import harness
from ivfast.ops import rmsnorm as kr

_B, _L, _CLIP = (16 * 836, 768, torch.bfloat16), (16 * 836, 1024, torch.bfloat16), (16 * 4100, 768, torch.bfloat16)
SHAPES = harness.pick_shapes("rmsnorm", gpu=[_B, _L, _CLIP], cpu=[(64, 96, torch.float32)], paper=[_B, _L])
OPS = ("rmsnorm",)
MODES = ("forward", "backward", "full")
IMPLS = ("eager", "compile", "triton")
EPS = 1e-6

_ROWS: list[dict] = []
_COMPILED: dict = {}


def _sid(s):
    return f"{s[0]}x{s[1]}-{str(s[2])[6:]}"


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    harness.write_kernel_results("rmsnorm", {
        "ops": list(OPS),
        "modes": list(MODES),
        "eps": EPS,
        "weight_dtype": "float32",
        "essential_bytes": "see benchmarks/bench_rmsnorm.py docstring",
    }, _ROWS)


def _essential_bytes(op, mode, rows, d, dtype):
    t = rows * d * torch.empty(0, dtype=dtype).element_size()
    small = d * 4 + rows * 4  # weight, rstd
    fwd, bwd = 2 * t + small, 3 * t + small
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _compiled(op):
    if op not in _COMPILED:
        _COMPILED[op] = torch.compile(kr.rmsnorm_ref)
    return _COMPILED[op]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
def test_rmsnorm(benchmark, shape, op, impl, mode):
    dev = harness.bench_device()
    harness.skip_unavailable(impl)
    rows, d, dtype = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=g).to(dev, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(dev).requires_grad_()

    f = {"triton": kr.rmsnorm, "eager": kr.rmsnorm_ref}.get(impl) or _compiled(op)
    inputs = [x, w]
    fwd = lambda: (f(x, w, EPS),)  # noqa: E731

    try:
        outs = fwd()
    except Exception as e:  # e.g. torch.compile without a toolchain
        if impl != "compile":
            raise
        pytest.skip(f"torch.compile unavailable here: {type(e).__name__}: {e}")
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=gen).to(dev, o.dtype) for o in outs]

    ms = harness.measure_mode(benchmark, mode, fwd, outs, inputs, grads)
    nbytes = _essential_bytes(op, mode, rows, d, dtype)
    _ROWS.append({
        "op": op, "impl": impl, "mode": mode, "rows": rows, "D": d, "dtype": str(dtype)[6:],
        "ms": round(ms, 4), "essential_bytes": nbytes,
        "gbs": round(nbytes / (ms * 1e-3) / 1e9, 1) if harness.on_gpu() else None,
    })
