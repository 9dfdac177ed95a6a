"""Fused adaLN kernels (kernels.adaln) against their PyTorch references, on the CPU through
Triton's interpreter.

Tolerances. Every kernel loads its inputs, computes in float32 and rounds once to the
output dtype, so each op is compared with its reference evaluated in float32 on the *same*
input values:
- float32: rtol 1e-5, atol 1e-5 x max|ref| (only the summation order differs).
- bfloat16 (per op): rtol 1e-2, atol 1e-4 x max|ref|: one rounding of a float32 result to 8
  significant bits (the interpreter truncates: up to 2^-7 = 0.78% relative; a GPU rounds to
  nearest: 0.39%); the atol covers float32 order noise on entries that cancel to ~0.
- bfloat16 (whole block / head): the matmuls also round their outputs to bf16, so there is
  no exact reference. Fused bf16 and eager bf16 (same bf16 weights) are both compared with
  float32 on the same values; the fused relative error (Frobenius) must stay under 2.5x the
  eager one (truncation in the interpreter is up to twice round-to-nearest) and under 3%.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton / the kernels are imported

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import adaln, dispatch  # noqa: E402
from kernels.adaln import (bias_silu, bias_silu_reference, fused_block_forward,  # noqa: E402
                           fused_final_forward, gated_residual, gated_residual_reference,
                           ln_modulate, ln_modulate_reference)
from ivfast.models.diffloss import AdaLNBlock, DiffusionLoss, FinalLayer, SimpleMLP  # noqa: E402

SHAPES = [(19, 588), (19, 768), (19, 1024), (5, 1536)]  # (rows, width): rows % block != 0
DTYPES = [torch.float32, torch.bfloat16]


def _close(actual, ref, dtype, what=""):
    """actual (dtype) vs ref computed in float32 on the same input values."""
    ref = ref.float()
    scale = max(ref.abs().max().item(), 1e-6)
    if dtype == torch.float32:
        rtol, atol = 1e-5, 1e-5 * scale
    else:
        rtol, atol = 1e-2, 1e-4 * scale
    assert actual.dtype == dtype, what
    torch.testing.assert_close(actual.float(), ref, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _rand(shape, dtype, seed, std=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(dtype)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _grads(out, inputs, gout):
    return torch.autograd.grad(out, inputs, gout)


def _rel(a, ref):
    return ((a.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


# ============================================================================ per-op kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_ln_modulate_forward_and_grads(dtype, rows, width, affine):
    assert dispatch.use_triton(torch.zeros(1))  # the interpreter serves CPU tensors
    x = _rand((rows, width), dtype, 0, std=2.0) + 0.5
    mod = _rand((rows, 3 * width), dtype, 1, std=0.5)  # shift | scale | gate, as the model has it
    w = _rand((width,), dtype, 2, std=0.3) + 1 if affine else None
    b = _rand((width,), dtype, 3, std=0.3) if affine else None
    gout = _rand((rows, width), dtype, 4)

    xs, ms = _leaf(x), _leaf(mod)
    ws, bs = (_leaf(w), _leaf(b)) if affine else (None, None)
    shift, scale, _ = ms.chunk(3, dim=-1)  # strided views (row stride 3N)
    out = ln_modulate(xs, shift, scale, ws, bs)
    leaves = [xs, ms] + ([ws, bs] if affine else [])
    got = _grads(out, leaves, gout)

    xr, mr = _leaf(x.float()), _leaf(mod.float())
    wr, br = (_leaf(w.float()), _leaf(b.float())) if affine else (None, None)
    shr, scr, _ = mr.chunk(3, dim=-1)
    ref = ln_modulate_reference(xr, shr, scr, wr, br)
    ref_leaves = [xr, mr] + ([wr, br] if affine else [])
    want = _grads(ref, ref_leaves, gout.float())

    _close(out, ref, dtype, "out")
    names = ["x", "shift|scale|gate"] + (["ln weight", "ln bias"] if affine else [])
    for name, g, r in zip(names, got, want):
        _close(g, r, dtype, f"d {name}")
    assert (got[1][:, 2 * width:] == 0).all()  # gate third untouched


def test_ln_modulate_contiguous_leaves_and_3d():
    """shift/scale as their own (B, T, N) tensors; grads of each."""
    x = _rand((2, 5, 96), torch.float32, 10)
    sh, sc = _rand((2, 5, 96), torch.float32, 11), _rand((2, 5, 96), torch.float32, 12)
    w, b = _rand((96,), torch.float32, 13) + 1, _rand((96,), torch.float32, 14)
    gout = _rand((2, 5, 96), torch.float32, 15)
    leaves = [_leaf(t) for t in (x, sh, sc, w, b)]
    out = ln_modulate(*leaves)
    got = _grads(out, leaves, gout)
    ref_leaves = [_leaf(t) for t in (x, sh, sc, w, b)]
    ref = ln_modulate_reference(*ref_leaves)
    want = _grads(ref, ref_leaves, gout)
    assert out.shape == x.shape
    _close(out, ref, torch.float32, "out")
    for name, g, r in zip(["x", "shift", "scale", "w", "b"], got, want):
        _close(g, r, torch.float32, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", SHAPES)
@pytest.mark.parametrize("has_bias", [True, False])
def test_bias_silu_forward_and_grads(dtype, rows, width, has_bias):
    a = _rand((rows, width), dtype, 20, std=3.0)
    bias = _rand((width,), dtype, 21) if has_bias else None
    gout = _rand((rows, width), dtype, 22)
    leaves = [_leaf(a)] + ([_leaf(bias)] if has_bias else [])
    out = bias_silu(*leaves)
    got = _grads(out, leaves, gout)
    ref_leaves = [_leaf(t.float()) for t in ([a] + ([bias] if has_bias else []))]
    ref = bias_silu_reference(*ref_leaves)
    want = _grads(ref, ref_leaves, gout.float())
    _close(out, ref, dtype, "out")
    for name, g, r in zip(["a", "bias"], got, want):
        _close(g, r, dtype, f"d {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", SHAPES)
def test_gated_residual_forward_and_grads(dtype, rows, width):
    x = _rand((rows, width), dtype, 30)
    mod = _rand((rows, 3 * width), dtype, 31)
    h = _rand((rows, width), dtype, 32, std=2.0)
    gout = _rand((rows, width), dtype, 33)
    xs, ms, hs = _leaf(x), _leaf(mod), _leaf(h)
    out = gated_residual(xs, ms[:, 2 * width:], hs)
    got = _grads(out, [xs, ms, hs], gout)
    xr, mr, hr = _leaf(x.float()), _leaf(mod.float()), _leaf(h.float())
    ref = gated_residual_reference(xr, mr[:, 2 * width:], hr)
    want = _grads(ref, [xr, mr, hr], gout.float())
    _close(out, ref, dtype, "out")
    for name, g, r in zip(["x", "gate (in mod)", "h"], got, want):
        _close(g, r, dtype, f"d {name}")
    assert (got[1][:, :2 * width] == 0).all()


# ============================================================================ block / final
def _randomize(module, seed):
    """Non-trivial values everywhere (the real init zeroes the adaLN and output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
            elif "norm" in name and "weight" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return module


def _run_block(module, x, y, fused, final=False):
    """out and grads (x, y, every parameter) of module(x, y) or its fused form."""
    x, y = _leaf(x), _leaf(y)
    if fused:
        fn = fused_final_forward if final else fused_block_forward
        out = fn(module, x, F.silu(y))
    else:
        out = module(x, y)
    gout = _rand(out.shape, out.dtype, 99)
    params = list(module.parameters())
    return [out] + list(_grads(out, [x, y] + params, gout))


def _names(module):
    return ["out", "x", "y"] + [n for n, _ in module.named_parameters()]


@pytest.mark.parametrize("final", [False, True])
@pytest.mark.parametrize("rows,width", [(19, 588), (5, 1536)])
def test_fused_block_fp32_matches_module(final, rows, width):
    torch.manual_seed(0)
    module = _randomize(FinalLayer(width, 1176) if final else AdaLNBlock(width), 5)
    x, y = _rand((rows, width), torch.float32, 40), _rand((rows, width), torch.float32, 41)
    ref = _run_block(module, x, y, fused=False, final=final)
    got = _run_block(module, x, y, fused=True, final=final)
    for name, g, r in zip(_names(module), got, ref):
        scale = r.abs().max().item()
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("final", [False, True])
@pytest.mark.parametrize("rows,width", [(19, 588), (5, 1536)])
def test_fused_block_bf16_error_like_eager(final, rows, width):
    m32 = _randomize(FinalLayer(width, 1176) if final else AdaLNBlock(width), 6)
    m16 = copy.deepcopy(m32).bfloat16()
    m32 = copy.deepcopy(m16).float()  # the same (bf16-valued) weights in float32
    x = _rand((rows, width), torch.bfloat16, 50)
    y = _rand((rows, width), torch.bfloat16, 51)
    truth = _run_block(m32, x.float(), y.float(), fused=False, final=final)
    eager = _run_block(m16, x, y, fused=False, final=final)
    fused = _run_block(m16, x, y, fused=True, final=final)
    for name, f, e, t in zip(_names(m32), fused, eager, truth):
        assert f.dtype == torch.bfloat16, name
        ef, ee = _rel(f, t), _rel(e, t)
        assert ef <= 2.5 * ee + 1e-3 and ef < 3e-2, (name, ef, ee)


def test_multi_tile_loops_and_partial_sums(monkeypatch):
    """Small tiles: several tiles per program and several programs per launch (the GPU layout)."""
    monkeypatch.setattr(adaln, "_INTERP_TILE_ELEMS", 2048)  # 588 wide -> 2 rows per tile
    monkeypatch.setattr(adaln, "_INTERP_PROGRAMS", 3)       # 19 rows -> 10 tiles over 3 programs
    module = _randomize(AdaLNBlock(588), 7)
    x, y = _rand((19, 588), torch.float32, 60), _rand((19, 588), torch.float32, 61)
    ref = _run_block(module, x, y, fused=False)
    got = _run_block(module, x, y, fused=True)
    for name, g, r in zip(_names(module), got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * r.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")
    a, bias = _rand((19, 588), torch.float32, 62), _rand((588,), torch.float32, 63)
    la, lb = _leaf(a), _leaf(bias)
    got = _grads(bias_silu(la, lb), [la, lb], torch.ones(19, 588))
    ra, rb = _leaf(a), _leaf(bias)
    want = _grads(bias_silu_reference(ra, rb), [ra, rb], torch.ones(19, 588))
    for g, r in zip(got, want):
        _close(g, r, torch.float32)


@pytest.mark.parametrize("width", [588, 1536])
def test_gpu_launch_sizes_in_interpreter(monkeypatch, width):
    """The tile sizes / program counts a GPU would get (2-row LN tiles, 128-512-column
    elementwise tiles, 4 programs per SM), run through the interpreter."""
    cuda = torch.device("cuda")
    row_cfg, elem_cfg, programs = adaln._row_cfg, adaln._elem_cfg, adaln._programs
    monkeypatch.setattr(adaln, "_sm_count", lambda device: 2)
    monkeypatch.setattr(adaln, "_row_cfg", lambda M, N, device, backward: row_cfg(M, N, cuda, backward))
    monkeypatch.setattr(adaln, "_elem_cfg", lambda M, N, device: elem_cfg(M, N, cuda))
    monkeypatch.setattr(adaln, "_programs", lambda n, device, col_tiles=1: programs(n, cuda, col_tiles))
    bm, bn, _ = row_cfg(19, width, cuda, False)
    assert bn == 2048 // (1 + (width < 1024)) and bm * bn == 4096
    assert elem_cfg(19, width, cuda)[1] == {588: 128, 1536: 512}[width]
    module = _randomize(AdaLNBlock(width), 11)
    x, y = _rand((19, width), torch.float32, 70), _rand((19, width), torch.float32, 71)
    ref = _run_block(module, x, y, fused=False)
    got = _run_block(module, x, y, fused=True)
    for name, g, r in zip(_names(module), got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * r.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def test_reference_fallbacks():
    """Unsupported dtype (float64) and kernels switched off take the references, same results."""
    module = _randomize(AdaLNBlock(40), 8).double()
    x, y = torch.randn(7, 40, dtype=torch.float64), torch.randn(7, 40, dtype=torch.float64)
    torch.testing.assert_close(fused_block_forward(module, x, F.silu(y)), module(x, y))
    module = module.float()
    x, y = x.float(), y.float()
    dispatch.set_enabled(False)
    try:
        assert not dispatch.use_triton(x)
        torch.testing.assert_close(fused_block_forward(module, x, F.silu(y)), module(x, y),
                                   rtol=1e-5, atol=1e-5)
    finally:
        dispatch.set_enabled(True)


def test_autocast_takes_the_references():
    """Under autocast (float32 weights, bf16 matmuls) the block runs the references; backward works."""
    module = _randomize(AdaLNBlock(64), 10)
    x, y = torch.randn(6, 64, requires_grad=True), torch.randn(6, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_block_forward(module, x, F.silu(y))
        ref = module(x, y)
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in module.parameters())
    torch.testing.assert_close(out.float(), ref.float(), rtol=5e-2, atol=5e-2)


def test_no_grad_forward():
    module = _randomize(AdaLNBlock(64), 9)
    x, y = torch.randn(6, 64), torch.randn(6, 64)
    with torch.no_grad():
        out = fused_block_forward(module, x, F.silu(y))
    with torch.inference_mode():
        out2 = fused_block_forward(module, x, F.silu(y))
    torch.testing.assert_close(out, module(x, y).detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out, out2)


# ============================================================================ whole head
def _net_pair(dtype, width=96, depth=2, seed=0):
    torch.manual_seed(seed)
    plain = SimpleMLP(in_channels=12, width=width, out_channels=24, z_channels=16, depth=depth)
    _randomize(plain, seed + 1)
    fused = SimpleMLP(in_channels=12, width=width, out_channels=24, z_channels=16, depth=depth,
                      fused=True)
    assert list(fused.state_dict()) == list(plain.state_dict())  # interchangeable
    fused.load_state_dict(plain.state_dict())
    return plain.to(dtype), fused.to(dtype)


def _run_net(net, x, t, z):
    x, z = _leaf(x), _leaf(z)
    out = net(x, t, z)
    gout = _rand(out.shape, out.dtype, 77)
    return [out] + list(_grads(out, [x, z] + list(net.parameters()), gout))


@pytest.mark.parametrize("width", [96, 100])
def test_simple_mlp_fused_fp32_equals_unfused(width):
    plain, fused = _net_pair(torch.float32, width=width)
    x, z = torch.randn(19, 12), torch.randn(19, 16)
    t = torch.randint(0, 1000, (19,))
    ref = _run_net(plain, x, t, z)
    got = _run_net(fused, x, t, z)
    names = ["out", "x", "z"] + [n for n, _ in plain.named_parameters()]
    assert len(got) == len(ref)
    for name, g, r in zip(names, got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=2e-5 * r.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def test_simple_mlp_fused_bf16_error_like_eager():
    plain16, fused16 = _net_pair(torch.bfloat16)
    truth_net = copy.deepcopy(plain16).float()
    x, z = _rand((19, 12), torch.bfloat16, 80), _rand((19, 16), torch.bfloat16, 81)
    t = torch.randint(0, 1000, (19,), generator=torch.Generator().manual_seed(82))
    truth = _run_net(truth_net, x.float(), t, z.float())
    eager = _run_net(plain16, x, t, z)
    fused = _run_net(fused16, x, t, z)
    names = ["out", "x", "z"] + [n for n, _ in plain16.named_parameters()]
    for name, f, e, tr in zip(names, fused, eager, truth):
        assert f.dtype == torch.bfloat16, name
        ef, ee = _rel(f, tr), _rel(e, tr)
        assert ef <= 2.5 * ee + 1e-3 and ef < 3e-2, (name, ef, ee)


def test_diffusion_loss_fused_equals_unfused():
    torch.manual_seed(0)
    plain = DiffusionLoss(target_channels=6, z_channels=8, width=64, depth=2)
    _randomize(plain.net, 3)
    fused = DiffusionLoss(target_channels=6, z_channels=8, width=64, depth=2, fused=True)
    fused.load_state_dict(plain.state_dict())
    assert fused.net.fused and not plain.net.fused
    z, x = torch.randn(21, 8), torch.rand(21, 6) * 2 - 1
    t, noise = plain.sample_t_noise(x, torch.Generator().manual_seed(7))
    a = plain.loss_given(z, x, t, noise)
    b = fused.loss_given(z, x, t, noise)
    assert set(a) == set(b) == {"loss", "mse", "vb"}
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(a["loss"], list(plain.parameters()))
    gb = torch.autograd.grad(b["loss"], list(fused.parameters()))
    for (name, _), g1, g2 in zip(plain.named_parameters(), ga, gb):
        torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-5 * g1.abs().max().item() + 1e-9,
                                   msg=lambda m: f"{name}: {m}")


# ============================================================================ saved activations
def saved_bytes(fn, params):
    """Bytes kept for backward by ``fn()``: distinct storages of the saved tensors, parameters
    excluded (a saved view keeps its whole storage alive, so storages are what is counted)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    kept = {}

    def pack(t):
        st = t.untyped_storage()
        if st.nbytes() and st.data_ptr() not in skip:
            kept[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())


def test_saved_bytes_fused_bf16_block_3x_below_unfused_fp32():
    width, rows = 1536, 8
    blk32 = AdaLNBlock(width)
    blk16 = copy.deepcopy(blk32).bfloat16()
    x, y = torch.randn(rows, width, requires_grad=True), torch.randn(rows, width, requires_grad=True)
    x16 = x.detach().bfloat16().requires_grad_()
    silu_y16 = F.silu(y.detach().bfloat16().requires_grad_())  # once per head, shared by blocks
    unfused = saved_bytes(lambda: blk32(x, y), blk32.parameters()) / rows
    fused = saved_bytes(lambda: fused_block_forward(blk16, x16, silu_y16), blk16.parameters()) / rows
    # unfused fp32: y, SiLU(y), x, LN(x), 1 + scale, Linear1 in, SiLU in, Linear2 in, h, the
    # (shift|scale|gate) storage kept by the gate view = 12 N floats (+ mean, rstd)
    assert unfused == 12 * width * 4 + 8
    # fused bf16: x, SiLU(y), shift|scale|gate, a, h = 7 N bf16 (+ float32 mean, rstd)
    assert fused == 7 * width * 2 + 8
    assert unfused >= 3 * fused, (unfused, fused)


def test_saved_bytes_fused_bf16_head_3x_below_unfused_fp32():
    rows = 4
    torch.manual_seed(0)
    net32 = SimpleMLP(in_channels=588, width=1536, out_channels=1176, z_channels=1024, depth=6)
    net16 = copy.deepcopy(net32).bfloat16()
    net16.fused = True
    x, z = torch.randn(rows, 588, requires_grad=True), torch.randn(rows, 1024, requires_grad=True)
    t = torch.randint(0, 1000, (rows,))
    x16, z16 = (v.detach().bfloat16().requires_grad_() for v in (x, z))
    unfused = saved_bytes(lambda: net32(x, t, z), net32.parameters()) / rows
    fused = saved_bytes(lambda: net16(x16, t, z16), net16.parameters()) / rows
    assert unfused >= 3 * fused, (unfused, fused)
