"""kernels.token_gather against the references in ivfast.models.token_ops.

The kernels run through Triton's interpreter on the CPU: TRITON_INTERPRET=1 is set before
triton or a kernel module is imported (triton decides at decoration time).

Expected values: the reference (``token_ops`` with the ``pos`` table or
``pos_embed.sincos_3d(grid)``) evaluated in float32 on float32 copies of the inputs (for
bf16 inputs: their exact values), differentiated by autograd.

Tolerances:
- fp32 outputs with a learnable table: rtol 1e-6 (one fp32 rounding of the same sum);
  with the fixed sincos: + atol 2e-6 + 4e-7 * p_max (the in-kernel sincos vs the float64
  table, see test_kernel_sincos).
- bf16 outputs: rtol 2^-7 (one bf16 ulp: the kernel rounds the fp32 sum once; the
  interpreter truncates instead of rounding, so a full ulp rather than half), plus the
  sincos atol.
- grad_x / grad_visible are copies of grad_out rows (and zeros): exactly equal.
- grad_pos / grad_mask_token are fp32 sums over the batch (and masked rows) in a different
  order than autograd: rtol 1e-5, atol 1e-5; in bf16 parameters one more bf16 ulp (2^-7).
  The backward is deterministic (no atomics): two runs give identical bits (tested).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels.token_gather as tg  # noqa: E402
from kernels import dispatch  # noqa: E402
from ivfast.models import pos_embed, token_ops  # noqa: E402



ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 2

# (D, grid, P): P = "sincos" (fixed, from grid) or the dtype of the learnable table.
CASES = [
    (588, (1, 1, 37), "table"),  # D not a power of two (nor a multiple of 16), N = 37
    (768, (2, 3, 5), "sincos"),
    (1024, (1, 1, 37), "table"),
    (1536, (3, 3, 4), "sincos"),
    (80, (2, 4, 5), "sincos"),  # D = 5 * 16
    (768, (1, 1, 37), "table_bf16"),  # bf16 table (bf16 models)
]


def _idx(n, m, seed, b=B):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:m].sort().values for _ in range(b)])


def _pos(kind, n, d, g):
    if kind == "sincos":
        return None
    dtype = torch.bfloat16 if kind == "table_bf16" else torch.float32
    return torch.randn(n, d, generator=g).to(dtype).requires_grad_()


def _p_max(grid):
    return max(grid) if grid else 0


def _tols(dtype, kind, grid):
    """(rtol, atol) for outputs."""
    atol = (2e-6 + 4e-7 * _p_max(grid)) if kind == "sincos" else 1e-6
    rtol = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-6
    return rtol, atol


def _sum_tols(param_dtype):
    return (1e-5 + 2.0 ** -7, 1e-5) if param_dtype == torch.bfloat16 else (1e-5, 1e-5)


def _f32(t):
    return None if t is None else t.detach().float().requires_grad_()


def _gather_case(d, grid, kind, dtype, idx, seed=0):
    n = grid[0] * grid[1] * grid[2]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=g).to(dtype).requires_grad_()
    pos = _pos(kind, n, d, g)
    fixed = grid if kind == "sincos" else None
    out = tg.add_pos_and_gather(x, idx, pos, fixed)
    assert out.shape == (B, idx.shape[1], d) and out.dtype == dtype
    go = torch.randn(out.shape, generator=g).to(dtype)
    inputs = [x] + ([pos] if pos is not None else [])
    grads = torch.autograd.grad(out, inputs, go)

    xr, posr = _f32(x), _f32(pos)
    table = posr if posr is not None else pos_embed.sincos_3d(d, *grid)
    ref = token_ops.add_pos_and_gather(xr, table, idx)
    ref_inputs = [xr] + ([posr] if posr is not None else [])
    ref_grads = torch.autograd.grad(ref, ref_inputs, go.float())

    rtol, atol = _tols(dtype, kind, fixed)
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=atol)
    assert grads[0].dtype == dtype
    assert torch.equal(grads[0].float(), ref_grads[0])  # grad_x: copies and zeros
    if pos is not None:
        assert grads[1].dtype == pos.dtype
        rtol, atol = _sum_tols(pos.dtype)
        torch.testing.assert_close(grads[1].float(), ref_grads[1], rtol=rtol, atol=atol)
    return grads


def _scatter_case(d, grid, kind, dtype, idx, seed=1, mt_dtype=torch.float32):
    n = grid[0] * grid[1] * grid[2]
    m = idx.shape[1]
    g = torch.Generator().manual_seed(seed)
    vis = torch.randn(B, m, d, generator=g).to(dtype).requires_grad_()
    mt = torch.randn(d, generator=g).to(mt_dtype).requires_grad_()
    pos = _pos(kind, n, d, g)
    fixed = grid if kind == "sincos" else None
    out = tg.scatter_with_mask_token(vis, idx, mt, pos, fixed)
    assert out.shape == (B, n, d) and out.dtype == dtype
    go = torch.randn(out.shape, generator=g).to(dtype)
    inputs = [vis, mt] + ([pos] if pos is not None else [])
    grads = torch.autograd.grad(out, inputs, go)

    visr, mtr, posr = _f32(vis), _f32(mt), _f32(pos)
    table = posr if posr is not None else pos_embed.sincos_3d(d, *grid)
    ref = token_ops.scatter_with_mask_token(visr, idx, mtr, table)
    ref_inputs = [visr, mtr] + ([posr] if posr is not None else [])
    ref_grads = torch.autograd.grad(ref, ref_inputs, go.float(), allow_unused=True)

    rtol, atol = _tols(dtype, kind, fixed)
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=atol)
    assert grads[0].dtype == dtype and grads[1].dtype == mt_dtype
    assert torch.equal(grads[0].float(), ref_grads[0])  # grad_visible: copies
    rtol, atol = _sum_tols(mt_dtype)
    ref_mt = ref_grads[1] if ref_grads[1] is not None else torch.zeros(d)
    torch.testing.assert_close(grads[1].float(), ref_mt, rtol=rtol, atol=atol)
    if pos is not None:
        rtol, atol = _sum_tols(pos.dtype)
        torch.testing.assert_close(grads[2].float(), ref_grads[2], rtol=rtol, atol=atol)
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d,grid,kind", CASES, ids=[f"{d}-{k}" for d, _, k in CASES])
def test_add_pos_and_gather(d, grid, kind, dtype):
    n = grid[0] * grid[1] * grid[2]
    idx = _idx(n, 11, seed=d)
    _gather_case(d, grid, kind, dtype, idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d,grid,kind", CASES, ids=[f"{d}-{k}" for d, _, k in CASES])
def test_scatter_with_mask_token(d, grid, kind, dtype):
    n = grid[0] * grid[1] * grid[2]
    idx = _idx(n, 11, seed=d + 1)
    _scatter_case(d, grid, kind, dtype, idx, mt_dtype=torch.bfloat16 if kind == "table_bf16" else torch.float32)


GRID = (2, 3, 5)  # N = 30
N = 30


@pytest.mark.parametrize(
    "idx",
    [
        torch.tensor([[0, 4, N - 1], [0, 1, N - 1]]),  # first and last token
        torch.tensor([[0], [N - 1]]),  # a single visible token
        torch.tensor([[N - 1], [N - 1]]),
        torch.arange(N).expand(B, N).clone(),  # everything visible
        torch.zeros(B, 0, dtype=torch.int64),  # nothing visible
    ],
    ids=["first-last", "single", "single-last", "all", "none"],
)
@pytest.mark.parametrize("kind", ["sincos", "table"])
def test_index_edge_cases(idx, kind):
    _gather_case(48, GRID, kind, torch.float32, idx)
    _scatter_case(48, GRID, kind, torch.float32, idx)


def test_int32_indices_and_non_contiguous_inputs():
    g = torch.Generator().manual_seed(5)
    idx = _idx(N, 9, seed=5)
    big = torch.randn(B, N, 2 * 48, generator=g)
    x = big[:, :, ::2].requires_grad_()  # stride 2 along D
    pos = torch.randn(48, N, generator=g).t().requires_grad_()  # transposed (N, D)
    out = tg.add_pos_and_gather(x, idx.to(torch.int32), pos)
    ref = token_ops.add_pos_and_gather(x, pos, idx)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    go = torch.randn(B, 9, 48 * 2, generator=g)[:, :, 1::2]  # non-contiguous upstream gradient
    gx, gp = torch.autograd.grad(out, [x, pos], go)
    rx, rp = torch.autograd.grad(ref, [x, pos], go)
    assert torch.equal(gx, rx)
    torch.testing.assert_close(gp, rp, rtol=1e-5, atol=1e-5)

    vis = torch.randn(B, 2 * 9, 48, generator=g)[:, ::2].requires_grad_()
    mt = torch.randn(1, 1, 48, generator=g).requires_grad_()  # the usual (1, 1, D) parameter
    out = tg.scatter_with_mask_token(vis, idx, mt, grid=GRID)
    ref = token_ops.scatter_with_mask_token(vis, idx, mt.reshape(-1), pos_embed.sincos_3d(48, *GRID))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=2e-6 + 4e-7 * 5)
    (gmt,) = torch.autograd.grad(out, [mt], go.new_ones(()).expand(B, N, 48))
    assert gmt.shape == mt.shape
    torch.testing.assert_close(gmt.reshape(-1), torch.full((48,), float(B * N - 2 * 9)), rtol=1e-6, atol=1e-6)


def test_backward_is_deterministic():
    idx = _idx(N, 12, seed=7)
    a = _scatter_case(48, GRID, "table", torch.float32, idx, seed=3)
    b = _scatter_case(48, GRID, "table", torch.float32, idx, seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    a = _gather_case(48, GRID, "table", torch.float32, idx, seed=3)
    b = _gather_case(48, GRID, "table", torch.float32, idx, seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_only_some_gradients():
    g = torch.Generator().manual_seed(9)
    idx = _idx(N, 6, seed=9)
    x = torch.randn(B, N, 48, generator=g)
    pos = torch.randn(N, 48, generator=g, requires_grad=True)
    (gp,) = torch.autograd.grad(tg.add_pos_and_gather(x, idx, pos).sum(), [pos])
    torch.testing.assert_close(gp, torch.autograd.grad(token_ops.add_pos_and_gather(x, pos, idx).sum(), [pos])[0])
    vis = torch.randn(B, 6, 48, generator=g, requires_grad=True)
    mt = torch.randn(48, generator=g)
    (gv,) = torch.autograd.grad(tg.scatter_with_mask_token(vis, idx, mt, grid=GRID).sum(), [vis])
    assert torch.equal(gv, torch.ones_like(vis))


def test_argument_errors():
    x = torch.randn(B, N, 48)
    idx = _idx(N, 4, seed=0)
    with pytest.raises(ValueError):
        tg.add_pos_and_gather(x, idx)  # neither pos nor grid
    with pytest.raises(ValueError):
        tg.add_pos_and_gather(x, idx, torch.zeros(N, 48), GRID)  # both
    with pytest.raises(ValueError):
        tg.add_pos_and_gather(x, idx, grid=(2, 3, 4))  # t*h*w != N
    with pytest.raises(ValueError):
        tg.add_pos_and_gather(torch.randn(B, N, 40), idx, grid=GRID)  # sincos needs D % 16 == 0
    with pytest.raises(ValueError):
        tg.scatter_with_mask_token(torch.randn(B, 4, 48), idx, torch.zeros(47), grid=GRID)


class _NoLaunch:
    """Stands in for a Triton kernel: any launch fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched while the references should serve")


def test_disabled_dispatch_uses_reference(monkeypatch):
    for name in ("_gather_fwd_kernel", "_gather_bwd_kernel", "_scatter_fwd_kernel", "_scatter_bwd_kernel"):
        monkeypatch.setattr(tg, name, _NoLaunch())
    dispatch.set_enabled(False)
    try:
        idx = _idx(N, 5, seed=2)
        x = torch.randn(B, N, 48, requires_grad=True)
        pos = torch.randn(N, 48)
        out = tg.add_pos_and_gather(x, idx, pos)
        assert torch.equal(out, token_ops.add_pos_and_gather(x, pos, idx))
        out.sum().backward()
        vis, mt = torch.randn(B, 5, 48), torch.randn(48)
        assert torch.equal(tg.scatter_with_mask_token(vis, idx, mt, pos),
                           token_ops.scatter_with_mask_token(vis, idx, mt, pos))
    finally:
        dispatch.set_enabled(True)


def test_cpu_without_interpreter_uses_reference():
    """Without TRITON_INTERPRET, CPU tensors get the references (all three kernel modules)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch\n"
        "import kernels.token_gather as tg, kernels.sincos as ks, kernels.rmsnorm as kr\n"
        "from kernels.dispatch import use_triton\n"
        "from ivfast.models import token_ops, pos_embed, diffloss\n"
        "assert not use_triton(torch.zeros(1))\n"
        "class NoLaunch:\n"
        "    def __getitem__(self, grid):\n"
        "        raise AssertionError('kernel launched')\n"
        "for mod, names in ((tg, ['_gather_fwd_kernel', '_scatter_fwd_kernel']),\n"
        "                   (ks, ['_timestep_kernel', '_sincos3d_table_kernel']), (kr, ['_rms_fwd_kernel'])):\n"
        "    for n in names:\n"
        "        setattr(mod, n, NoLaunch())\n"
        "idx = torch.tensor([[0, 3, 5], [1, 2, 7]])\n"
        "x, pos = torch.randn(2, 8, 16), torch.randn(8, 16)\n"
        "assert torch.equal(tg.add_pos_and_gather(x, idx, pos), token_ops.add_pos_and_gather(x, pos, idx))\n"
        "vis, mt = torch.randn(2, 3, 16), torch.randn(16)\n"
        "assert torch.equal(tg.scatter_with_mask_token(vis, idx, mt, pos),\n"
        "                   token_ops.scatter_with_mask_token(vis, idx, mt, pos))\n"
        "t = torch.arange(7)\n"
        "assert torch.equal(ks.timestep_embedding(t, 16), diffloss.timestep_embedding(t, 16))\n"
        "assert torch.equal(ks.sincos_3d(16, 2, 2, 2, device='cpu'), pos_embed.sincos_3d(16, 2, 2, 2))\n"
        "x, r, w = torch.randn(4, 32), torch.randn(4, 32), torch.randn(32)\n"
        "assert torch.equal(kr.rmsnorm(x, w), kr.rmsnorm_reference(x, w))\n"
        "a, b = kr.add_rmsnorm(x, r, w)\n"
        "c, d = kr.add_rmsnorm_reference(x, r, w)\n"
        "assert torch.equal(a, c) and torch.equal(b, d)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
