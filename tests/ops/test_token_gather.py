"""ivfast.ops.token_gather: the gather with its index-only backward, and the position-add and
mask-token scatter kernels against their references (forward and gradients; compiled on a GPU,
else through Triton's interpreter), with a learnable table or the in-kernel sine-cosine
(``sincos3d_at``)."""
import math

import pytest
import torch

from ivfast.ops import dispatch, launch
from ivfast.ops import token_gather as TG
from ivfast.ops.sincos import sincos_3d
from tests.ops.common import DEVICE, NoLaunch, check_op, close, randn, saved_bytes

B = 2
GRID = (2, 3, 5)  # N = 30
N = 30
# (D, grid, P): P = "sincos" (fixed, from grid) or the dtype of the learnable table.
CASES = [
    (40, (1, 1, 19), torch.float32),
    (588, (1, 1, 7), torch.float32),  # D neither a power of two nor a multiple of 16
    (48, (2, 3, 5), "sincos"),
    (80, (2, 4, 5), "sincos"),
    (40, (1, 1, 19), torch.bfloat16),  # a bf16 table (bf16 models)
]
CASE_IDS = [f"{d}-{k if isinstance(k, str) else str(k)[6:]}" for d, _, k in CASES]


def sincos_atol(grid):
    """The in-kernel formula's documented error (ivfast.ops.sincos): ~4e-7 * p plus sin/cos rounding."""
    return 2e-6 + 4e-7 * max(grid)


def idx_for(n, m, seed, b=B):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:m].sort().values for _ in range(b)]).to(DEVICE)


def pos_for(kind, n, d, seed):
    return None if kind == "sincos" else randn(n, d, seed=seed, dtype=kind)


# ============================================================================ gather_tokens
def test_gather_tokens_lean_backward_keeps_only_the_index():
    x = randn(B, N, 24, seed=0)
    idx = idx_for(N, 7, seed=1)
    plain = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, 24))
    out = TG.gather_tokens(x, idx)
    assert torch.equal(out, plain) and "GatherTokens" in type(out.grad_fn).__name__
    g = randn(*out.shape, seed=2, grad=False)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(plain, x, g)[0])
    lean = saved_bytes(lambda: TG.gather_tokens(x, idx), exclude=[x])
    with dispatch.override(lean=False):
        assert TG.gather_tokens(x, idx).grad_fn.name() == "GatherBackward0"
        assert saved_bytes(lambda: TG.gather_tokens(x, idx)) >= x.nbytes + lean
    assert lean == B * 7 * 8  # the int64 index only (x is live anyway)
    with torch.no_grad():
        assert TG.gather_tokens(x, idx).grad_fn is None


# ============================================================================ add_pos_at
def add_pos_case(d, grid, kind, dtype, idx, seed=0):
    n = math.prod(grid)
    x = randn(B, idx.shape[1], d, seed=seed, dtype=dtype)
    pos = pos_for(kind, n, d, seed + 1)
    fixed = tuple(grid) if kind == "sincos" else None
    atol = sincos_atol(grid) if fixed else 0.0
    return check_op(lambda x, p: TG.add_pos_at(x, idx, p, fixed), lambda x, p: TG.add_pos_at_ref(x, idx, p, fixed),
                    [x, pos], atol=atol, what=f"add_pos_at D{d} {kind}")


def scatter_case(d, grid, kind, dtype, idx, seed=1, mt_dtype=torch.float32):
    n = math.prod(grid)
    vis = randn(B, idx.shape[1], d, seed=seed, dtype=dtype)
    mt = randn(d, seed=seed + 1, dtype=mt_dtype)
    pos = pos_for(kind, n, d, seed + 2)
    fixed = tuple(grid) if kind == "sincos" else None
    atol = sincos_atol(grid) if fixed else 0.0
    return check_op(lambda v, t, p: TG.scatter_with_mask_token(v, idx, t, p, fixed),
                    lambda v, t, p: TG.scatter_with_mask_token_ref(v, idx, t, p, fixed),
                    [vis, mt, pos], atol=atol, what=f"scatter D{d} {kind}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d,grid,kind", CASES, ids=CASE_IDS)
def test_add_pos_at(d, grid, kind, dtype):
    add_pos_case(d, grid, kind, dtype, idx_for(math.prod(grid), 5, seed=d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d,grid,kind", CASES, ids=CASE_IDS)
def test_scatter_with_mask_token(d, grid, kind, dtype):
    mt_dtype = torch.bfloat16 if kind == torch.bfloat16 else torch.float32
    scatter_case(d, grid, kind, dtype, idx_for(math.prod(grid), 5, seed=d + 1), mt_dtype=mt_dtype)


@pytest.mark.parametrize(
    "idx",
    [
        torch.tensor([[0, 4, N - 1], [0, 1, N - 1]]),  # first and last token
        torch.tensor([[0], [N - 1]]),  # a single visible token
        torch.arange(N).expand(B, N).clone(),  # everything visible
        torch.zeros(B, 0, dtype=torch.int64),  # nothing visible
    ],
    ids=["first-last", "single", "all", "none"],
)
@pytest.mark.parametrize("kind", ["sincos", torch.float32], ids=["sincos", "table"])
def test_index_edge_cases(idx, kind):
    idx = idx.to(DEVICE)
    add_pos_case(48, GRID, kind, torch.float32, idx)
    scatter_case(48, GRID, kind, torch.float32, idx)


def table_f64(dim, t, h, w):
    """sincos_3d in float64: [temporal dim/4 | x 3dim/8 | y 3dim/8], each [sin(p omega) | cos(p omega)]."""
    def one(d, n):
        half = d // 2
        a = torch.arange(n, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
        return torch.cat([a.sin(), a.cos()], dim=1)

    ti, y, x = (c.reshape(-1) for c in torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
    dt = dim // 4
    hs = (dim - dt) // 2
    return torch.cat([one(dt, t)[ti], one(hs, w)[x], one(hs, h)[y]], dim=1)


@pytest.mark.parametrize("d,rows", [(32, slice(None)), (1536, slice(-16, None))])
def test_in_kernel_sincos_at_large_positions(d, rows):
    """add_pos_at of zeros is sincos3d_at itself: 32 frames on a 4 x 4 grid, against the float64
    table, within the formula's documented error of the float32 table's."""
    grid = (32, 4, 4)
    idx = torch.arange(math.prod(grid))[rows][None]
    out = TG.add_pos_at(torch.zeros(1, idx.shape[1], d, device=DEVICE), idx.to(DEVICE), grid=grid)[0]
    close(out, table_f64(d, *grid)[idx[0]], sincos_3d(d, *grid)[idx[0]].to(DEVICE), atol=sincos_atol(grid))


def test_int32_indices_and_strided_inputs():
    idx = idx_for(N, 9, seed=5).to(torch.int32)
    x = randn(B, 9, 96, seed=6, grad=False)[:, :, ::2].requires_grad_()  # stride 2 along D
    pos = randn(48, N, seed=7, grad=False).t().requires_grad_()  # a transposed (N, D) table
    check_op(lambda x, p: TG.add_pos_at(x, idx, p), lambda x, p: TG.add_pos_at_ref(x, idx, p), [x, pos],
             what="strided add_pos_at")
    vis = randn(B, 18, 48, seed=8, grad=False)[:, ::2].requires_grad_()  # stride 2 along M
    mt = randn(1, 1, 96, seed=9, grad=False)[..., ::2].requires_grad_()  # a strided (1, 1, D) parameter
    check_op(lambda v, t: TG.scatter_with_mask_token(v, idx, t, grid=GRID),
             lambda v, t: TG.scatter_with_mask_token_ref(v, idx, t, grid=GRID), [vis, mt],
             atol=sincos_atol(GRID), what="strided scatter")


def test_backward_is_deterministic():
    idx = idx_for(N, 12, seed=7)
    for case in (add_pos_case, scatter_case):
        a = case(48, GRID, torch.float32, torch.float32, idx, seed=3)
        b = case(48, GRID, torch.float32, torch.float32, idx, seed=3)
        assert all(torch.equal(u, v) for u, v in zip([a[0], *a[1]], [b[0], *b[1]]))


def test_gpu_tiles_in_interpreter(monkeypatch):
    monkeypatch.setattr(launch, "gpu_tiles", lambda device: True)
    assert launch.row_tile(B * 7, 588, gpu=True) == (16, 128)
    idx = idx_for(7, 5, seed=11)
    add_pos_case(588, (1, 1, 7), torch.float32, torch.float32, idx)
    scatter_case(588, (1, 1, 7), torch.float32, torch.float32, idx)
    scatter_case(80, (2, 4, 5), "sincos", torch.float32, idx_for(40, 9, seed=12))


def test_only_some_gradients():
    idx = idx_for(N, 6, seed=9)
    x, pos = randn(B, 6, 48, seed=10, grad=False), randn(N, 48, seed=11)
    check_op(lambda x, p: TG.add_pos_at(x, idx, p), lambda x, p: TG.add_pos_at_ref(x, idx, p), [x, pos],
             what="table gradient only")
    vis, mt = randn(B, 6, 48, seed=12), randn(48, seed=13, grad=False)
    (gv,) = torch.autograd.grad(TG.scatter_with_mask_token(vis, idx, mt, grid=GRID).sum(), [vis])
    assert torch.equal(gv, torch.ones_like(vis))


def test_argument_errors():
    x, idx = torch.randn(B, 4, 48), idx_for(N, 4, seed=0)
    with pytest.raises(ValueError):
        TG.add_pos_at(x, idx)  # neither pos nor grid
    with pytest.raises(ValueError):
        TG.add_pos_at(x, idx, torch.zeros(N, 48), GRID)  # both
    with pytest.raises(ValueError):
        TG.add_pos_at(x, idx, torch.zeros(N, 40))  # table width != D
    with pytest.raises(ValueError):
        TG.add_pos_at(torch.randn(B, 4, 40), idx, grid=GRID)  # sincos needs D % 16 == 0
    with pytest.raises(ValueError):
        TG.add_pos_at(torch.randn(B, 5, 48), idx, grid=GRID)  # idx (B, M) must match x (B, M, D)
    with pytest.raises(TypeError):
        TG.add_pos_at(x, idx.float(), grid=GRID)
    with pytest.raises(ValueError):
        TG.scatter_with_mask_token(x, idx, torch.zeros(47), grid=GRID)


def test_disabled_dispatch_takes_the_references(monkeypatch):
    for name in ("_add_pos_fwd_kernel", "_pos_grad_kernel", "_scatter_fwd_kernel", "_scatter_bwd_kernel"):
        monkeypatch.setattr(TG, name, NoLaunch())
    idx = idx_for(N, 5, seed=2)
    x, pos, vis, mt = randn(B, 5, 48, seed=3), randn(N, 48, seed=4), randn(B, 5, 48, seed=5), randn(48, seed=6)
    with dispatch.override(fused=False):
        out = TG.add_pos_at(x, idx, pos)
        assert torch.equal(out, TG.add_pos_at_ref(x, idx, pos))
        out.sum().backward()
        assert torch.equal(TG.scatter_with_mask_token(vis, idx, mt, grid=GRID),
                           TG.scatter_with_mask_token_ref(vis, idx, mt, grid=GRID))
