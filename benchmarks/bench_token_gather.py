"""Benchmark: the masked-token gather with the position add, and the mask-token scatter
(ivfast.ops.token_gather).

Run (not part of ``make test``; pytest.ini disables benchmarks by default)::

    .venv/bin/python -m pytest benchmarks/bench_token_gather.py --benchmark-enable -q
    TRITON_INTERPRET=1 .venv/bin/python -m pytest benchmarks/bench_token_gather.py --benchmark-enable -q  # CPU + kernels

Work measured:

- ``gather``: ``add_pos_at(gather_tokens(x, idx), idx, P)``: the encoder input, (B, N, D) -> (B, M, D);
- ``scatter``: ``scatter_with_mask_token(enc_out, idx, mask_token, P)``: the predictor input,
  (B, M, D) -> (B, N, D).

``P`` is a learnable table (``pos=table``, in the token dtype, gradient wanted) or the fixed
3-D sincos (``pos=sincos``: the baselines read a precomputed device table, as the model's
``PositionTable`` buffer is; the kernel computes it from the token index). Modes: ``forward``,
``backward`` (autograd.grad on a kept graph) and ``full`` (forward + backward).

Implementations: ``eager`` (``torch.gather`` and the reference functions the tests use,
``add_pos_at_ref`` / ``scatter_with_mask_token_ref``), ``compile`` (``torch.compile`` of the same
functions), and ``triton`` (``gather_tokens`` with the index-only backward, then the
``add_pos_at`` / ``scatter_with_mask_token`` kernels; on a CPU only when TRITON_INTERPRET=1,
through the interpreter). On a CPU ``compile`` is skipped unless IVFAST_BENCH_COMPILE=1 (compile time
dwarfs these tiny shapes; the point of the CPU run is that the harness works).

Shapes: GPU, the real Stage-1 batch: 16 clips x 16 frames x 16 x 16 = 4096 tokens, mask 0.8
per frame (52 of 256 visible -> M = 832), widths 768 and 1024, bf16. CPU: 2 x (2 x 4 x 4), 4
of 16 visible per frame, width 64, fp32.

On a GPU each row records the median time (``harness.gpu_time_ms``), the essential bytes
(below), the achieved GB/s and its share of ``harness.copy_bandwidth_gbs()``. Essential
bytes are what the operation must move at least, the same for every implementation:

- gather forward: read the B*M gathered x rows, the table rows used (union over the batch;
  0 for sincos) and idx; write B*M rows.
- gather backward: read grad_out (B*M rows) and idx; write grad_x (B*N rows) and grad_pos
  (N rows, table only).
- scatter forward: read the B*M visible rows, idx, the table (N rows; 0 for sincos); write
  B*N rows.
- scatter backward: read grad_out (B*N rows) and idx; write grad_visible (B*M rows) and
  grad_pos (N rows, table only); the mask token's gradient is a (D,) vector.
- full: forward + backward.

Results: benchmarks/results/token_gather-<gpu|cpu>-<date>.{json,md}.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import harness
from ivfast.ops import token_gather as tg
from ivfast.ops.sincos import sincos_3d

_GPU = [(16, (16, 16, 16), 52, 768, torch.bfloat16), (16, (16, 16, 16), 52, 1024, torch.bfloat16)]
SHAPES = harness.pick_shapes("token_gather", gpu=_GPU, cpu=[(2, (2, 4, 4), 4, 64, torch.float32)], paper=_GPU)
OPS = ("gather", "scatter")
POS_KINDS = ("table", "sincos")
MODES = ("forward", "backward", "full")
IMPLS = ("eager", "compile", "triton")

_ROWS: list[dict] = []
_COMPILED: dict = {}


def _sid(s):
    b, grid, vis, d, dtype = s
    return f"B{b}-{'x'.join(map(str, grid))}-vis{vis}-D{d}-{str(dtype)[6:]}"


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    harness.write_kernel_results("token_gather", {
        "ops": list(OPS),
        "pos": list(POS_KINDS),
        "modes": list(MODES),
        "essential_bytes": "see benchmarks/bench_token_gather.py docstring",
    }, _ROWS)


def _inputs(shape, dev):
    b, grid, vis_per_frame, d, dtype = shape
    t, h, w = grid
    hw = h * w
    n = t * hw
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([
        torch.cat([torch.randperm(hw, generator=g)[:vis_per_frame] + f * hw for f in range(t)]).sort().values
        for _ in range(b)
    ]).to(dev)
    m = idx.shape[1]
    x = torch.randn(b, n, d, generator=g).to(dev, dtype).requires_grad_()
    enc = torch.randn(b, m, d, generator=g).to(dev, dtype).requires_grad_()
    mask_token = torch.randn(d, generator=g).to(dev, dtype).requires_grad_()
    table = (0.02 * torch.randn(n, d, generator=g)).to(dev, dtype).requires_grad_()
    fixed = sincos_3d(d, t, h, w).to(dev, dtype)  # the baselines' precomputed buffer
    return idx, x, enc, mask_token, table, fixed


def _essential_bytes(op, kind, mode, shape, idx):
    b, grid, _, d, dtype = shape
    n = grid[0] * grid[1] * grid[2]
    m = idx.shape[1]
    row = d * torch.empty(0, dtype=dtype).element_size()
    ib = idx.numel() * idx.element_size()
    if op == "gather":
        used = torch.unique(idx).numel() if kind == "table" else 0
        fwd = b * m * row + used * row + ib + b * m * row
        bwd = b * m * row + ib + b * n * row + (n * row if kind == "table" else 0)
    else:
        fwd = b * m * row + ib + (n * row if kind == "table" else 0) + b * n * row
        bwd = b * n * row + ib + b * m * row + (n * row if kind == "table" else 0)
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _eager_gather(x, idx, table):
    vis = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return tg.add_pos_at_ref(vis, idx, table)


def _eager_scatter(enc, idx, mask_token, table):
    return tg.scatter_with_mask_token_ref(enc, idx, mask_token, table)


def _compiled(name):
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile({"gather": _eager_gather, "scatter": _eager_scatter}[name])
    return _COMPILED[name]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", POS_KINDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
def test_token_gather(benchmark, shape, op, kind, impl, mode):
    dev = harness.bench_device()
    harness.skip_unavailable(impl)
    b, grid, _, d, dtype = shape
    idx, x, enc, mask_token, table, fixed = _inputs(shape, dev)

    if op == "gather":
        inputs = [x] + ([table] if kind == "table" else [])
        if impl == "triton":
            fwd = (lambda: tg.add_pos_at(tg.gather_tokens(x, idx), idx, table)) if kind == "table" else \
                (lambda: tg.add_pos_at(tg.gather_tokens(x, idx), idx, grid=grid))
        else:
            f = _eager_gather if impl == "eager" else _compiled("gather")
            tab = table if kind == "table" else fixed
            fwd = lambda: f(x, idx, tab)  # noqa: E731
    else:
        inputs = [enc, mask_token] + ([table] if kind == "table" else [])
        if impl == "triton":
            fwd = (lambda: tg.scatter_with_mask_token(enc, idx, mask_token, table)) if kind == "table" else \
                (lambda: tg.scatter_with_mask_token(enc, idx, mask_token, grid=grid))
        else:
            f = _eager_scatter if impl == "eager" else _compiled("scatter")
            tab = table if kind == "table" else fixed
            fwd = lambda: f(enc, idx, mask_token, tab)  # noqa: E731

    try:
        out = fwd()
    except Exception as e:  # e.g. torch.compile without a toolchain
        if impl != "compile":
            raise
        pytest.skip(f"torch.compile unavailable here: {type(e).__name__}: {e}")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dev, out.dtype)

    ms = harness.measure_mode(benchmark, mode, fwd, out, inputs, grad_out)
    nbytes = _essential_bytes(op, kind, mode, shape, idx)
    _ROWS.append({
        "op": op, "pos": kind, "impl": impl, "mode": mode, "B": b, "grid": "x".join(map(str, grid)),
        "M": idx.shape[1], "D": d, "dtype": str(dtype)[6:], "ms": round(ms, 4),
        "essential_bytes": nbytes, "gbs": round(nbytes / (ms * 1e-3) / 1e9, 1) if harness.on_gpu() else None,
    })
