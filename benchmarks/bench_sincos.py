"""Benchmark: sine-cosine embeddings: the timestep-embedding kernel (ivfast.ops.timestep_embedding)
and the fixed position table (ivfast.ops.sincos).

Run (not part of ``make test``; pytest.ini disables benchmarks by default)::

    .venv/bin/python -m pytest benchmarks/bench_sincos.py --benchmark-enable -q
    TRITON_INTERPRET=1 .venv/bin/python -m pytest benchmarks/bench_sincos.py --benchmark-enable -q  # CPU + kernels

Work measured (forward only: neither has a backward; the table is a constant and the
timesteps are integers):

- ``sincos_3d``: the fixed (t*h*w, D) position table on the device: ``sincos_3d`` builds it in
  float64 on the CPU and copies it over, what a fixed position table pays when it is (re)built,
  e.g. for another grid. No kernel: the token kernels compute positions in place
  (``sincos3d_at``; benchmarks/bench_token_gather.py).
- ``timestep``: ``timestep_embedding(t, 256)`` for the diffusion head's rows (reference
  ``timestep_embedding_ref``, on the device).

Implementations: ``eager`` (the references the tests use), ``compile`` (``torch.compile`` of
them), ``triton`` (``timestep_embedding``; on a CPU only when TRITON_INTERPRET=1, through the
interpreter). On a CPU ``compile`` is skipped unless IVFAST_BENCH_COMPILE=1.

Shapes: GPU: tables (16 x 16 x 16, 768) and (32 x 16 x 16, 1024) in fp32; timesteps for
16 clips x 3264 masked tokens (52,224 rows) and 4x that (``diffusion_batch_mul`` 4), 256
wide (IVFAST_BENCH_SHAPES=paper: the 16-frame table and 52,224 rows). CPU: (2 x 4 x 4, 64) and
64 timesteps.

Essential bytes: the output written (and the timesteps read). On a GPU each row also
records the achieved GB/s and its share of ``harness.copy_bandwidth_gbs()``.
Results: benchmarks/results/sincos-<gpu|cpu>-<date>.{json,md}.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import harness
from ivfast.ops import sincos as ks
from ivfast.ops import timestep_embedding as te

TABLES = harness.pick_shapes("sincos_3d", gpu=[(768, (16, 16, 16)), (1024, (32, 16, 16))], cpu=[(64, (2, 4, 4))],
                             paper=[(768, (16, 16, 16))])
TIMESTEPS = harness.pick_shapes("timestep_embedding", gpu=[(52224, 256), (4 * 52224, 256)], cpu=[(64, 256)],
                                paper=[(52224, 256)])
IMPLS = ("eager", "compile", "triton")
TABLE_IMPLS = ("eager", "compile")

_ROWS: list[dict] = []
_COMPILED: dict = {}


_sync = harness.sync


_time_ms = harness.time_ms


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    harness.write_kernel_results("sincos", {
        "mode": "forward (no backward exists)",
        "essential_bytes": "output written (+ timesteps read)",
    }, _ROWS)


def _run(benchmark, impl, call, row):
    def fn():
        call()
        _sync()

    try:
        fn()
    except Exception as e:  # e.g. torch.compile without a toolchain
        if impl != "compile":
            raise
        pytest.skip(f"torch.compile unavailable here: {type(e).__name__}: {e}")
    benchmark(fn)
    ms = _time_ms(fn)
    row.update(ms=round(ms, 4), gbs=round(row["essential_bytes"] / (ms * 1e-3) / 1e9, 1) if harness.on_gpu() else None)
    _ROWS.append(row)


def _table(dim, t, h, w, device):
    return ks.sincos_3d(dim, t, h, w).to(device)


@pytest.mark.parametrize("impl", TABLE_IMPLS)
@pytest.mark.parametrize("dim,grid", TABLES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"D{v}")
def test_sincos_3d(benchmark, dim, grid, impl):
    dev = harness.bench_device()
    harness.skip_unavailable(impl)
    f = _COMPILED.setdefault("sincos_3d", torch.compile(_table)) if impl == "compile" else _table
    call = lambda: f(dim, *grid, dev)  # noqa: E731
    rows = grid[0] * grid[1] * grid[2]
    _run(benchmark, impl, call, {"op": "sincos_3d", "impl": impl, "mode": "forward", "rows": rows, "D": dim,
                                 "grid": "x".join(map(str, grid)), "dtype": "float32",
                                 "essential_bytes": rows * dim * 4})


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m,dim", TIMESTEPS, ids=lambda v: str(v))
def test_timestep_embedding(benchmark, m, dim, impl):
    dev = harness.bench_device()
    harness.skip_unavailable(impl)
    t = torch.randint(0, 1000, (m,), generator=torch.Generator().manual_seed(0)).to(dev)
    if impl == "triton":
        call = lambda: te.timestep_embedding(t, dim)  # noqa: E731
    else:
        f = te.timestep_embedding_ref
        if impl == "compile":
            f = _COMPILED.setdefault("timestep", torch.compile(te.timestep_embedding_ref))
        call = lambda: f(t, dim)  # noqa: E731
    _run(benchmark, impl, call, {"op": "timestep", "impl": impl, "mode": "forward", "rows": m, "D": dim,
                                 "grid": None, "dtype": "float32", "essential_bytes": m * dim * 4 + m * 8})
