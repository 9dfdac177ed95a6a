"""ivfast.ops.adaln: the fused adaLN block and final layer against their references, forward and
every gradient (compiled on a GPU, else through Triton's interpreter: its tiles, multi-tile loops and
the GPU's tiles), and the cases that must take the references."""
import pytest
import torch
import torch.nn.functional as F

from ivfast.ops import adaln, dispatch, launch
from tests.ops.common import DEVICE, NoLaunch, check_op, randn, saved_bytes

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(1, 24), (7, 40), (19, 588)]  # (rows, width): odd widths, rows not a multiple of a tile


def block_args(rows, width, dtype, seed=0, affine=True, biases=True, lead=()):
    """x, silu_y and the block's parameters (non-trivial: the real init zeroes adaLN), eps."""
    s = iter(range(seed * 16, seed * 16 + 16))
    lin = lambda o, i: randn(o, i, seed=next(s), dtype=dtype, std=i ** -0.5)  # noqa: E731
    vec = lambda n, mean=0.0: randn(n, seed=next(s), dtype=dtype, std=0.3, mean=mean)  # noqa: E731
    x = randn(*lead, rows, width, seed=next(s), dtype=dtype, std=2.0, mean=0.5)
    silu_y = F.silu(randn(*lead, rows, width, seed=next(s), grad=False)).to(dtype).requires_grad_()
    ada_w, ada_b = lin(3 * width, width), vec(3 * width) if biases else None
    ln_w, ln_b = (vec(width, 1.0), vec(width)) if affine else (None, None)
    w1, b1 = lin(width, width), vec(width) if biases else None
    w2, b2 = lin(width, width), vec(width) if biases else None
    return [x, silu_y, ada_w, ada_b, ln_w, ln_b, w1, b1, w2, b2, 1e-6]


def final_args(rows, width, out, dtype, seed=0, bias=True):
    s = iter(range(seed * 16, seed * 16 + 16))
    x = randn(rows, width, seed=next(s), dtype=dtype, std=2.0, mean=0.5)
    silu_y = F.silu(randn(rows, width, seed=next(s), grad=False)).to(dtype).requires_grad_()
    ada_w = randn(2 * width, width, seed=next(s), dtype=dtype, std=width ** -0.5)
    ada_b = randn(2 * width, seed=next(s), dtype=dtype, std=0.3) if bias else None
    lin_w = randn(out, width, seed=next(s), dtype=dtype, std=width ** -0.5)
    lin_b = randn(out, seed=next(s), dtype=dtype, std=0.3) if bias else None
    return [x, silu_y, ada_w, ada_b, lin_w, lin_b, 1e-6]


def check_block(args, what):
    return check_op(adaln.adaln_block, adaln.adaln_block_ref, args, what=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,width", SHAPES)
def test_block(rows, width, dtype):
    assert dispatch.use_triton(torch.zeros(1, device=DEVICE))  # compiled on a GPU, else the interpreter
    check_block(block_args(rows, width, dtype), f"block {rows}x{width}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_block_without_affine_and_biases_on_3d_rows(dtype):
    """LayerNorm without affine and Linears without biases (the other kernel variants), (B, T, N) rows."""
    check_block(block_args(5, 40, dtype, seed=1, affine=False, biases=False, lead=(3,)), "bare block")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,width,out", [(1, 24, 7), (7, 40, 80), (19, 588, 1176)])
def test_final_layer(rows, width, out, dtype):
    check_op(adaln.adaln_final, adaln.adaln_final_ref, final_args(rows, width, out, dtype),
             what=f"final {rows}x{width}->{out}")


def test_block_with_strided_parameters():
    """Parameters that are views with a non-unit stride (the kernels read 1-D ones)."""
    args = block_args(7, 40, torch.float32, seed=9)
    for i in (2, 4, 5, 6, 7, 9):  # ada_w, ln_w, ln_b, w1, b1, b2
        wide = torch.stack([args[i].detach(), torch.full_like(args[i], float("nan"))], dim=-1)
        args[i] = wide[..., 0].requires_grad_()
    check_block(args, "strided parameters")


def test_final_layer_without_biases():
    check_op(adaln.adaln_final, adaln.adaln_final_ref, final_args(7, 40, 9, torch.float32, seed=2, bias=False),
             what="final without biases")


def test_multi_tile_loops_and_partial_sums(monkeypatch):
    """Small interpreter tiles: several row tiles per program and several programs, each writing
    a partial column sum (the layout of the GPU's looping backward kernels)."""
    monkeypatch.setattr(launch, "INTERP_TILE_ELEMS", 2048)  # 588 wide -> 2 rows per tile
    monkeypatch.setattr(launch, "INTERP_PROGRAMS", 3)  # 19 rows -> 10 tiles over 3 programs
    assert launch.whole_row_tile(19, 588, gpu=False, backward=True)[0] == 2
    check_block(block_args(19, 588, torch.float32, seed=3), "block, small tiles")
    check_op(adaln.adaln_final, adaln.adaln_final_ref, final_args(19, 588, 20, torch.float32, seed=3),
             what="final, small tiles")


@pytest.mark.parametrize("rows,width,sms", [(19, 588, 132), (19, 588, 2), (5, 1536, 132)])
def test_gpu_tiles_in_interpreter(monkeypatch, rows, width, sms):
    """The tiles and program counts a GPU gets (2 SMs: programs loop over several row tiles),
    run through the interpreter."""
    monkeypatch.setattr(launch, "gpu_tiles", lambda device: True)
    monkeypatch.setattr(launch, "sm_count", lambda device: sms)
    check_block(block_args(rows, width, torch.float32, seed=4), f"block, GPU tiles, {sms} SMs")


def test_references_where_no_kernel_serves(monkeypatch):
    """float64, kernels switched off and mixed dtypes take the references (no launch)."""
    for name in ("_ln_mod_fwd_kernel", "_bias_silu_fwd_kernel", "_gated_fwd_kernel"):
        monkeypatch.setattr(adaln, name, NoLaunch())
    args = block_args(7, 40, torch.float64, seed=5)
    assert torch.equal(adaln.adaln_block(*args), adaln.adaln_block_ref(*args))
    args = block_args(7, 40, torch.float32, seed=5)
    with dispatch.override(fused=False):
        assert not dispatch.use_triton(args[0])
        assert torch.equal(adaln.adaln_block(*args), adaln.adaln_block_ref(*args))
        fargs = final_args(7, 40, 9, torch.float32)
        assert torch.equal(adaln.adaln_final(*fargs), adaln.adaln_final_ref(*fargs))
    args[2] = args[2].detach().bfloat16()  # a bf16 adaLN weight with float32 activations
    assert torch.equal(adaln.adaln_block(*args), adaln.adaln_block_ref(*args))


def test_autocast_takes_the_references():
    """Under autocast (float32 parameters, bf16 matmuls) the reference runs and backward works."""
    args = block_args(6, 40, torch.float32, seed=6)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = adaln.adaln_block(*args)
        ref = adaln.adaln_block_ref(*args)
    assert torch.equal(out, ref)
    out.float().sum().backward()
    assert all(a.grad is not None and a.grad.dtype == torch.float32 for a in args[:10] if a is not None)


def test_no_grad_forward_equals_the_recording_one():
    args = block_args(7, 40, torch.float32, seed=7)
    with_grad = adaln.adaln_block(*args)
    with torch.no_grad():
        out = adaln.adaln_block(*args)
    with torch.inference_mode():
        out2 = adaln.adaln_block(*args)
    assert torch.equal(out, with_grad.detach()) and torch.equal(out, out2)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_block_saves_x_silu_y_mod_a_h_and_the_statistics(dtype):
    """The kernel path keeps, per row, x, silu_y, mod (3N), Linear1's output a and Linear2's
    output h (7N elements) and float32 mean / rstd (8 bytes), less than the reference."""
    rows, width = 8, 64
    args = block_args(rows, width, dtype, seed=8)
    params = [a for a in args[2:10]]
    kept = saved_bytes(lambda: adaln.adaln_block(*args), exclude=params)
    plain = saved_bytes(lambda: adaln.adaln_block_ref(*args), exclude=params)
    elem = torch.empty(0, dtype=dtype).element_size()
    assert kept == rows * (7 * width * elem + 8)
    assert kept < plain
