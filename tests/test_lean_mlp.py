"""Lean MLPs (ivfast.models.lean_mlp): forward values and gradients equal to the plain
F.linear / F.gelu ops (fp32 tight, bf16 within one bf16 rounding), less saved for backward,
unchanged parameter names, and correct under activation checkpointing."""
import pytest
import torch
import torch.nn.functional as F

from ivfast.memory.saved_tensors import saved_bytes
from ivfast.models import lean_mlp
from ivfast.models.checkpointing import run_block
from ivfast.models.layers import Block, Mlp
from ivfast.models.predictor import ModernBertMLP, Predictor

BF16_TOL = dict(atol=2e-2, rtol=2e-2)  # bf16: same ops, summation order in the matmuls may differ
FP32_TOL = dict(atol=1e-5, rtol=1e-5)


def _ref_gelu_mlp(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def _ref_geglu_mlp(x, wi, wo):
    inp, gate = F.linear(x, wi).chunk(2, dim=-1)
    return F.linear(F.gelu(inp) * gate, wo)


def _leaves(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [None if s is None else (torch.randn(*s, generator=g) * 0.5).to(dtype).requires_grad_() for s in shapes]


def _check(fn, ref, shapes, dtype, seed):
    a = _leaves(shapes, dtype, seed)
    b = [None if t is None else t.detach().clone().requires_grad_() for t in a]
    out, want = fn(*a), ref(*b)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(out, want, **tol)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    out.backward(go)
    want.backward(go)
    for i, (p, q) in enumerate(zip(a, b)):
        if p is not None:
            torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m: f"input {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,d,hidden,out,bias", [((3, 7), 13, 29, 13, True), ((5,), 16, 64, 9, True),
                                                    ((2, 3, 4), 8, 5, 8, False)])
def test_gelu_mlp_matches_reference(dtype, lead, d, hidden, out, bias):
    shapes = [(*lead, d), (hidden, d), (hidden,) if bias else None, (out, hidden), (out,) if bias else None]
    _check(lean_mlp.gelu_mlp, _ref_gelu_mlp, shapes, dtype, seed=hash((lead, d)) % 1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,d,hidden", [((3, 7), 13, 11), ((1, 33), 32, 48), ((6,), 5, 1)])
def test_geglu_mlp_matches_reference(dtype, lead, d, hidden):
    _check(lean_mlp.geglu_mlp, _ref_geglu_mlp, [(*lead, d), (2 * hidden, d), (d, hidden)], dtype, seed=d)


@pytest.mark.parametrize("dtype,a", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_lean_mlps_save_input_and_first_output_only(dtype, a):
    n, d, hidden = 10, 12, 20
    mlp = Mlp(d, hidden).to(dtype)
    geglu = ModernBertMLP(d, hidden).to(dtype)
    x = torch.randn(n, d, dtype=dtype, requires_grad=True)
    for module, plain_extra in ((mlp, hidden), (geglu, 2 * hidden)):
        module.lean = False
        plain, _ = saved_bytes(lambda: module(x), params=module.parameters())
        module.lean = True
        lean, _ = saved_bytes(lambda: module(x), params=module.parameters())
        first = hidden if module is mlp else 2 * hidden
        assert lean.total == n * a * (d + first)
        assert plain.total == lean.total + n * a * plain_extra


def test_modules_switch_keeps_values_gradients_and_names():
    torch.manual_seed(0)
    for make in (lambda: Mlp(10, 23, 7), lambda: ModernBertMLP(10, 17)):
        plain, lean = make(), make()
        lean.load_state_dict(plain.state_dict())
        lean.lean = True
        assert list(lean.state_dict()) == list(plain.state_dict())
        x = torch.randn(2, 9, 10)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = plain(xa), lean(xb)
        torch.testing.assert_close(yb, ya, **FP32_TOL)
        (ya.square().sum()).backward()
        (yb.square().sum()).backward()
        torch.testing.assert_close(xb.grad, xa.grad, **FP32_TOL)
        for (n, p), q in zip(plain.named_parameters(), lean.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **FP32_TOL, msg=lambda m: f"{n}: {m}")
        with torch.no_grad():  # outside autograd: the plain path
            torch.testing.assert_close(lean(x), plain(x))


def test_predictor_and_block_under_checkpointing():
    torch.manual_seed(1)
    ref = Predictor(in_dim=12, width=16, depth=2, heads=2, mlp_hidden=24, window=4, global_every=2, first_layer_id=0)
    lean = Predictor(in_dim=12, width=16, depth=2, heads=2, mlp_hidden=24, window=4, global_every=2, first_layer_id=0,
                     checkpointing=True, lean_mlp=True)
    lean.load_state_dict(ref.state_dict())
    assert list(lean.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 11, 12)
    ya, yb = ref(x), lean(x)
    torch.testing.assert_close(yb, ya, **FP32_TOL)
    ya.sum().backward()
    yb.sum().backward()
    for (n, p), q in zip(ref.named_parameters(), lean.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")

    blk = Block(16, 2, mlp_ratio=2.5, drop_path=0.0)
    blk.mlp.lean = True
    xb = torch.randn(3, 7, 16, requires_grad=True)
    run_block(blk, xb, checkpoint=True).sum().backward()
    g_ck = [p.grad.clone() for p in blk.parameters()] + [xb.grad.clone()]
    blk.zero_grad()
    xb.grad = None
    blk.mlp.lean = False
    blk(xb).sum().backward()
    for a, b in zip(g_ck, [p.grad for p in blk.parameters()] + [xb.grad]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_autocast_keeps_the_plain_path():
    mlp = Mlp(8, 16)
    mlp.lean = True
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert mlp.fc1.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 13), (5, 16), (1, 2, 3, 4)])
def test_layer_scale_matches_reference(dtype, shape):
    ref = lambda x, g: (x.float() * g.float()).to(x.dtype)  # noqa: E731
    _check(lean_mlp.layer_scale, ref, [shape, (shape[-1],)], dtype, seed=len(shape))


def test_layer_scale_saves_its_input_in_bf16():
    from ivfast.models.layers import LayerScale

    ls = LayerScale(24, init=0.1).to(torch.bfloat16)
    x = torch.randn(6, 24, dtype=torch.bfloat16, requires_grad=True)
    plain, _ = saved_bytes(lambda: ls(x), params=ls.parameters())
    ls.lean = True
    lean, _ = saved_bytes(lambda: ls(x), params=ls.parameters())
    assert lean.total == 6 * 24 * 2  # x itself
    assert plain.total == 6 * 24 * 4 + 24 * 4  # the fp32 copies of x and of gamma


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 13), (5, 16), (2, 1)])
def test_cosine_align_matches_reference(dtype, shape):
    from ivfast.models.heads import cosine_align_loss

    g = torch.Generator().manual_seed(len(shape))
    pred = F.normalize(torch.randn(shape, generator=g), dim=-1).to(dtype).requires_grad_()
    target = F.normalize(torch.randn(shape, generator=g), dim=-1).to(dtype)
    ref_pred = pred.detach().clone().requires_grad_()
    got, want = cosine_align_loss(pred, target, lean=True), cosine_align_loss(ref_pred, target)
    assert torch.equal(got, want)
    got.backward()
    want.backward()
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(pred.grad, ref_pred.grad, **tol)
    saved, _ = saved_bytes(lambda: cosine_align_loss(pred, target, lean=True), exclude=[target])
    assert saved.total == 0  # only the (live) target is kept


def test_mlp_head_lean_matches_plain():
    from ivfast.models.heads import MLPHead

    torch.manual_seed(2)
    plain = MLPHead(12, 20, hidden=9)
    lean = MLPHead(12, 20, hidden=9)
    lean.load_state_dict(plain.state_dict())
    lean.lean = True
    x = torch.randn(3, 5, 12)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = plain(xa), lean(xb)
    torch.testing.assert_close(yb, ya, **FP32_TOL)
    ya.pow(3).sum().backward()
    yb.pow(3).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, **FP32_TOL)
    for p, q in zip(plain.parameters(), lean.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 13), (4, 16), (2, 1, 3)])
def test_layer_norm_l2_matches_reference(dtype, shape):
    eps = 1e-5
    ref = lambda x, w, b: F.normalize(F.layer_norm(x, (x.shape[-1],), w, b, eps), dim=-1)  # noqa: E731
    fn = lambda x, w, b: lean_mlp.layer_norm_l2(x, w, b, eps)  # noqa: E731
    _check(fn, ref, [shape, (shape[-1],), (shape[-1],)], dtype, seed=7 + len(shape))


@pytest.mark.parametrize("chunk", [3, 1000])
def test_recompute_rows_matches_plain_autograd(chunk):
    """The diffusion loss's variational-bound term, recomputed a few rows at a time in backward."""
    from ivfast.models.diffloss import _vb_terms
    from ivfast.models.diffusion import GaussianDiffusion

    d, c, m = GaussianDiffusion(num_timesteps=50, learn_sigma=True), 7, 11
    g = torch.Generator().manual_seed(chunk)
    out = torch.randn(m, 2 * c, generator=g, requires_grad=True)
    target, x_t = torch.randn(m, c, generator=g), torch.randn(m, c, generator=g)
    t = torch.randint(0, 50, (m,), generator=g)
    t[0] = 0  # the decoder NLL branch too
    ref_out = out.detach().clone().requires_grad_()
    want = _vb_terms(d, c, ref_out, target, x_t, t)
    got = lean_mlp.recompute_rows(lambda *xs: _vb_terms(d, c, *xs), out, target, x_t, t, chunk=chunk)
    assert torch.equal(got, want)
    w = torch.randn(m, generator=g)
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(out.grad, ref_out.grad, **FP32_TOL)
    assert out.grad[:, :c].abs().max() == 0  # eps_hat is detached in the VB term
    saved, _ = saved_bytes(lambda: lean_mlp.recompute_rows(lambda *xs: _vb_terms(d, c, *xs), out, target, x_t, t))
    plain, _ = saved_bytes(lambda: _vb_terms(d, c, out, target, x_t, t))
    assert saved.total == out.nbytes + target.nbytes + x_t.nbytes + t.nbytes < plain.total


def _ref_norm_linear(x, ln_w, ln_b, w, eps=1e-5):
    return F.linear(F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps), w)


def _ref_norm_geglu_mlp(x, ln_w, ln_b, wi, wo, eps=1e-5):
    return _ref_geglu_mlp(F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps), wi, wo)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,d,out", [((7, 13), 40, 120), ((5,), 16, 9), ((2, 3, 4), 1, 6)])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_linear_matches_reference(dtype, lead, d, out, bias):
    """fp32: FP32_TOL (1e-5); bf16: BF16_TOL (2e-2); in practice equal (same kernels)."""
    fn = lambda x, lw, lb, w: lean_mlp.norm_linear(x, lw, lb, 1e-5, w)  # noqa: E731
    shapes = [(*lead, d), (d,), (d,) if bias else None, (out, d)]
    _check(fn, _ref_norm_linear, shapes, dtype, seed=d + out + bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,d,hidden", [((7, 13), 40, 23), ((1, 33), 32, 48), ((6,), 5, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_geglu_mlp_matches_reference(dtype, lead, d, hidden, bias):
    fn = lambda x, lw, lb, wi, wo: lean_mlp.norm_geglu_mlp(x, lw, lb, 1e-5, wi, wo)  # noqa: E731
    shapes = [(*lead, d), (d,), (d,) if bias else None, (2 * hidden, d), (d, hidden)]
    _check(fn, _ref_norm_geglu_mlp, shapes, dtype, seed=d + hidden + bias)


def test_norm_functions_skip_unneeded_gradients():
    """Only the inputs that require grad get one (ctx.needs_input_grad), with the same values."""
    g = torch.Generator().manual_seed(3)
    x, lw, lb = torch.randn(4, 6, 40, generator=g), torch.randn(40, generator=g), torch.randn(40, generator=g)
    wi, wo = torch.randn(46, 40, generator=g), torch.randn(40, 23, generator=g)
    for wanted in ([0], [1], [1, 2], [3], [4], [0, 4]):
        a = [t.clone().requires_grad_(i in wanted) for i, t in enumerate((x, lw, lb, wi, wo))]
        b = [t.detach().clone().requires_grad_(i in wanted) for i, t in enumerate((x, lw, lb, wi, wo))]
        lean_mlp.norm_geglu_mlp(a[0], a[1], a[2], 1e-5, a[3], a[4]).square().sum().backward()
        _ref_norm_geglu_mlp(*b).square().sum().backward()
        if any(i < 4 for i in wanted):
            lean_mlp.norm_linear(a[0], a[1], a[2], 1e-5, a[3]).sum().backward()
            _ref_norm_linear(*b[:4]).sum().backward()
        for i, (p, q) in enumerate(zip(a, b)):
            assert (p.grad is None) == (i not in wanted)
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, **FP32_TOL)


def _layer(width=40, heads=4, hidden=23, lean=False):
    from ivfast.models.predictor import ModernBertLayer

    layer = ModernBertLayer(width, heads, hidden, layer_id=1, is_global=False, window=6, rope_theta=1e4,
                            norm_eps=1e-5)
    layer.attn.lean = layer.mlp.lean = lean
    return layer


@pytest.mark.parametrize("dtype,a", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_lean_layer_keeps_no_layer_norm_outputs(dtype, a):
    """The lean ModernBERT layer saves exactly the two LayerNorm outputs (2 x width per token) less
    than the plain norms followed by the lean MLP (model.lean_mlp's layer before), and the MLP's
    two hidden-wide tensors less on top against the plain path."""
    from ivfast.models.predictor import rope_tables

    torch.manual_seed(4)
    b, n, width, hidden = 7, 13, 40, 23
    layer = _layer(width, hidden=hidden).to(dtype)
    cos, sin = rope_tables(n, width // 4, 1e4, "cpu")
    x = torch.randn(b, n, width, dtype=dtype, requires_grad=True)

    def norms_then_lean_mlp():  # the modules one by one: only ModernBertMLP.forward is lean
        y = x + layer.attn(layer.attn_norm(x), cos, sin)
        return y + layer.mlp(layer.mlp_norm(y))

    got = {}
    for mode, fn in (("plain", lambda: layer(x, cos, sin)), ("mlp only", norms_then_lean_mlp),
                     ("lean", lambda: layer(x, cos, sin))):
        layer.attn.lean = layer.mlp.lean = mode != "plain"
        got[mode], _ = saved_bytes(fn, params=layer.parameters())
    assert got["mlp only"].total - got["lean"].total == b * n * 2 * width * a
    assert got["plain"].total - got["mlp only"].total == b * n * 2 * hidden * a


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_predictor_lean_layers_match_plain(dtype, monkeypatch):
    """The whole predictor, lean on vs off, same weights: outputs and every gradient (fp32: 1e-5;
    bf16: BF16_TOL), unchanged state_dict names, and the lean Functions really run."""
    torch.manual_seed(5)
    kw = dict(in_dim=12, width=40, depth=3, heads=4, mlp_hidden=23, window=4, global_every=2, first_layer_id=0)
    ref, lean = Predictor(**kw).to(dtype), Predictor(**kw, lean_mlp=True).to(dtype)
    with torch.no_grad():  # non-trivial norm weights
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    lean.load_state_dict(ref.state_dict())
    assert list(lean.state_dict()) == list(ref.state_dict())
    calls = []
    for name in ("norm_linear", "norm_geglu_mlp"):
        fn = getattr(lean_mlp, name)
        monkeypatch.setattr(lean_mlp, name, lambda *args, _fn=fn, _n=name: calls.append(_n) or _fn(*args))
    x = torch.randn(2, 7 * 13 // 2, 12, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), lean(xb)
    assert sorted(set(calls)) == ["norm_geglu_mlp", "norm_linear"] and len(calls) == 6
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(yb, ya, **tol)
    go = torch.randn(ya.shape, dtype=dtype)
    ya.backward(go)
    yb.backward(go)
    torch.testing.assert_close(xb.grad, xa.grad, **tol)
    for (n, p), q in zip(ref.named_parameters(), lean.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **tol, msg=lambda m: f"{n}: {m}")
