"""ivfast.ops.lean: each lean Function gives the plain composition's values (bit for bit: the same
ops) and its gradients (within the rule of tests.support against the float64 composition), keeps
less for backward (measured here with saved-tensor hooks), and the API runs the plain composition
wherever lean does not apply."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ivfast.ops import dispatch, lean
from tests.ops.common import check_op, randn, saved_bytes

DTYPES = [torch.float32, torch.bfloat16]
IDS = ["fp32", "bf16"]


def plain_geglu(x, wi, wo):
    inp, gate = F.linear(x, wi).chunk(2, dim=-1)
    return F.linear(F.gelu(inp) * gate, wo)


PLAIN = {
    "gelu_mlp": lambda x, w1, b1, w2, b2, approximate="none": F.linear(
        F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2),
    "geglu_mlp": plain_geglu,
    "norm_linear": lambda x, lw, lb, eps, w: F.linear(F.layer_norm(x, (x.shape[-1],), lw, lb, eps), w),
    "norm_geglu_mlp": lambda x, lw, lb, eps, wi, wo: plain_geglu(F.layer_norm(x, (x.shape[-1],), lw, lb, eps), wi, wo),
    "layer_scale": lambda x, g: (x.float() * g.float()).to(x.dtype),
    "cosine_align": lambda p, t: (2.0 - 2.0 * (p.float() * t.float()).sum(dim=-1)).mean(),
    "layer_norm_l2": lambda x, w, b, eps: F.normalize(F.layer_norm(x, (x.shape[-1],), w, b, eps), dim=-1),
}


def check_lean(name, args, what=""):
    """Values equal to the plain composition, gradients within the rule."""
    fn = getattr(lean, name)
    out = fn(*args)
    assert type(out.grad_fn).__name__.startswith("_"), f"{name}: the lean Function did not run"
    assert torch.equal(out, PLAIN[name](*args)), f"{name}: values differ from the plain composition"
    check_op(fn, PLAIN[name], args, what=f"{name} {what}")


def r(*shape, dtype, seed, std=0.5, mean=0.0, grad=True):
    return randn(*shape, seed=seed, dtype=dtype, std=std, mean=mean, grad=grad)


# ============================================================================ values and gradients
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("lead,d,hidden,out,bias", [((3, 7), 13, 29, 13, True), ((19,), 24, 40, 9, True),
                                                    ((2, 3, 4), 8, 5, 8, False)])
def test_gelu_mlp(dtype, lead, d, hidden, out, bias, approximate):
    args = [r(*lead, d, dtype=dtype, seed=0), r(hidden, d, dtype=dtype, seed=1), r(hidden, dtype=dtype, seed=2),
            r(out, hidden, dtype=dtype, seed=3), r(out, dtype=dtype, seed=4), approximate]
    if not bias:
        args[2] = args[4] = None
    check_lean("gelu_mlp", args, f"{lead} {approximate}")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("lead,d,hidden", [((3, 7), 13, 11), ((1, 19), 24, 40), ((6,), 5, 1)])
def test_geglu_mlp(dtype, lead, d, hidden):
    check_lean("geglu_mlp", [r(*lead, d, dtype=dtype, seed=5), r(2 * hidden, d, dtype=dtype, seed=6),
                             r(d, hidden, dtype=dtype, seed=7)], str(lead))


def norm_args(lead, d, dtype, affine, seed):
    lw = r(d, dtype=dtype, seed=seed, std=0.3, mean=1.0) if affine else None
    lb = r(d, dtype=dtype, seed=seed + 1, std=0.3) if affine == "bias" else None
    return [r(*lead, d, dtype=dtype, seed=seed + 2, std=2.0), lw, lb, 1e-5]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("lead,d,out", [((7, 13), 40, 120), ((19,), 24, 9), ((2, 3, 4), 1, 6)])
@pytest.mark.parametrize("affine", ["bias", "weight", None])
def test_norm_linear(dtype, lead, d, out, affine):
    check_lean("norm_linear", norm_args(lead, d, dtype, affine, 8) + [r(out, d, dtype=dtype, seed=11)], str(lead))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("lead,d,hidden", [((7, 13), 40, 23), ((1, 19), 24, 40), ((6,), 5, 1)])
@pytest.mark.parametrize("affine", ["bias", None])
def test_norm_geglu_mlp(dtype, lead, d, hidden, affine):
    wi, wo = r(2 * hidden, d, dtype=dtype, seed=15), r(d, hidden, dtype=dtype, seed=16)
    check_lean("norm_geglu_mlp", norm_args(lead, d, dtype, affine, 12) + [wi, wo], str(lead))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", [(3, 7, 13), (19, 24), (1, 2, 3, 4)])
def test_layer_scale(dtype, shape):
    gamma = r(shape[-1], dtype=dtype, seed=18, std=0.1)
    check_lean("layer_scale", [r(*shape, dtype=dtype, seed=17), gamma], str(shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", [(3, 7, 13), (19, 24), (2, 1)])
def test_cosine_align(dtype, shape):
    pred = F.normalize(r(*shape, dtype=torch.float32, seed=19, grad=False), dim=-1).to(dtype).requires_grad_()
    target = F.normalize(r(*shape, dtype=torch.float32, seed=20, grad=False), dim=-1).to(dtype)
    check_lean("cosine_align", [pred, target], str(shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", [(3, 7, 13), (19, 24), (2, 1, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_l2(dtype, shape, affine):
    w = r(shape[-1], dtype=dtype, seed=22, std=0.3, mean=1.0) if affine else None
    b = r(shape[-1], dtype=dtype, seed=23, std=0.3) if affine else None
    check_lean("layer_norm_l2", [r(*shape, dtype=dtype, seed=21, std=2.0), w, b, 1e-5], str(shape))


def rowwise(out, target, t):
    """A row-wise elementwise function of float and integer tensors (a loss term's shape)."""
    mean, logvar = out.chunk(2, dim=-1)
    w = (t.float() / 10.0)[:, None]
    nll = 0.5 * (logvar + (target - mean) ** 2 * torch.exp(-logvar))
    return (nll * w + torch.where(t[:, None] == 0, mean, 0.0)).sum(-1)


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_recompute_rows(chunk):
    out = r(11, 14, dtype=torch.float32, seed=24)
    target, t = r(11, 7, dtype=torch.float32, seed=25, grad=False), torch.arange(11) % 4
    got = lean.recompute_rows(rowwise, out, target, t, chunk=chunk)
    assert "RecomputeRows" in type(got.grad_fn).__name__
    assert torch.equal(got, rowwise(out, target, t))
    check_op(lambda o, tg: lean.recompute_rows(rowwise, o, tg, t, chunk=chunk), lambda o, tg: rowwise(o, tg, t),
             [out, target.requires_grad_()], what=f"recompute_rows chunk {chunk}")


# ============================================================================ what is saved
def test_what_each_function_saves():
    """Bytes kept for backward (parameters excluded), lean vs plain, bf16, per the module docstring."""
    dt, e = torch.bfloat16, 2
    rows, d, hidden = 10, 12, 20
    x = r(rows, d, dtype=dt, seed=30)
    w1, b1 = r(hidden, d, dtype=dt, seed=31), r(hidden, dtype=dt, seed=32)
    w2, b2 = r(d, hidden, dtype=dt, seed=33), r(d, dtype=dt, seed=34)
    wi, wo = r(2 * hidden, d, dtype=dt, seed=35), r(d, hidden, dtype=dt, seed=36)
    lw, lb = r(d, dtype=dt, seed=37), r(d, dtype=dt, seed=38)
    params = [w1, b1, w2, b2, wi, wo, lw, lb]

    def both(name, *args, exclude=()):
        kept = saved_bytes(lambda: getattr(lean, name)(*args), exclude=params + list(exclude))
        plain = saved_bytes(lambda: PLAIN[name](*args), exclude=params + list(exclude))
        return kept, plain

    stats = 2 * torch.ops.aten.native_layer_norm(x, (d,), lw, lb, 1e-5)[1].nbytes  # mean, rstd (bf16 on the CPU)
    kept, plain = both("gelu_mlp", x, w1, b1, w2, b2)
    assert kept == rows * (d + hidden) * e and plain == kept + rows * hidden * e  # GELU(h) not kept
    kept, plain = both("geglu_mlp", x, wi, wo)
    assert kept == rows * (d + 2 * hidden) * e and plain == kept + 2 * rows * hidden * e  # GELU(inp), the product
    kept, plain = both("norm_linear", x, lw, lb, 1e-5, wi)
    assert kept == rows * d * e + stats and plain == kept + rows * d * e  # the norm's output not kept
    kept, plain = both("norm_geglu_mlp", x, lw, lb, 1e-5, wi, wo)
    assert kept == rows * (d + 2 * hidden) * e + stats and plain == kept + rows * (d + 2 * hidden) * e
    kept, plain = both("layer_scale", x, lw)
    assert kept == rows * d * e and plain == rows * d * 4 + d * 4  # not the float32 copies of x and gamma
    target = r(rows, d, dtype=dt, seed=39, grad=False)
    kept, plain = both("cosine_align", x, target, exclude=[target])
    assert kept == 0 and plain == rows * d * 4  # the live target only, not its float32 copy
    kept, plain = both("layer_norm_l2", x, lw, lb, 1e-5)
    assert kept == rows * d * e < plain
    t = torch.arange(rows)
    out = r(rows, 2 * d, dtype=torch.float32, seed=40)
    kept = saved_bytes(lambda: lean.recompute_rows(rowwise, out, target.float(), t), exclude=[out, t])
    plain = saved_bytes(lambda: rowwise(out, target.float(), t), exclude=[out, t])
    assert kept == rows * d * 4 < plain  # its inputs (the float32 target a copy here), nothing else


# ============================================================================ where lean does not apply
def test_plain_composition_where_lean_does_not_apply():
    f32 = torch.float32
    x, w1, w2 = r(4, 8, dtype=f32, seed=41), r(16, 8, dtype=f32, seed=42), r(8, 16, dtype=f32, seed=43)
    assert type(lean.gelu_mlp(x, w1, None, w2, None).grad_fn).__name__.startswith("_")
    with dispatch.override(lean=False):
        assert not dispatch.lean_applies(x)
        assert type(lean.gelu_mlp(x, w1, None, w2, None).grad_fn).__name__ == "MmBackward0"
    with torch.no_grad():
        assert lean.gelu_mlp(x, w1, None, w2, None).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lean.gelu_mlp(x, w1, None, w2, None)
    assert y.dtype == torch.bfloat16 and not type(y.grad_fn).__name__.startswith("_")
    y.float().sum().backward()
    assert w1.grad is not None and w1.grad.dtype == torch.float32
    target = r(4, 8, dtype=torch.float32, seed=44)  # a target that needs a gradient: plain
    loss = lean.cosine_align(x, target)
    assert not type(loss.grad_fn).__name__.startswith("_")
    loss.backward()
    assert target.grad is not None


def test_only_the_needed_gradients():
    """Only the inputs that require grad get one (ctx.needs_input_grad), with the plain values."""
    g = torch.Generator().manual_seed(3)
    x, lw, lb = torch.randn(4, 6, 40, generator=g), torch.randn(40, generator=g), torch.randn(40, generator=g)
    wi, wo = torch.randn(46, 40, generator=g), torch.randn(40, 23, generator=g)
    for wanted in ([0], [1], [1, 2], [3], [4], [0, 4]):
        a = [t.clone().requires_grad_(i in wanted) for i, t in enumerate((x, lw, lb, wi, wo))]
        b = [t.clone().requires_grad_(i in wanted) for i, t in enumerate((x, lw, lb, wi, wo))]
        lean.norm_geglu_mlp(a[0], a[1], a[2], 1e-5, a[3], a[4]).square().sum().backward()
        PLAIN["norm_geglu_mlp"](b[0], b[1], b[2], 1e-5, b[3], b[4]).square().sum().backward()
        if any(i < 4 for i in wanted):
            lean.norm_linear(a[0], a[1], a[2], 1e-5, a[3]).sum().backward()
            PLAIN["norm_linear"](b[0], b[1], b[2], 1e-5, b[3]).sum().backward()
        for i, (p, q) in enumerate(zip(a, b)):
            assert (p.grad is None) == (i not in wanted)
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)


def test_under_activation_checkpointing():
    """A checkpointed block recomputes through the lean Functions like through any other op."""
    x = r(3, 7, 16, dtype=torch.float32, seed=45)
    params = [r(40, 16, dtype=torch.float32, seed=46), r(40, dtype=torch.float32, seed=47),
              r(16, 40, dtype=torch.float32, seed=48), r(16, dtype=torch.float32, seed=49),
              r(16, dtype=torch.float32, seed=50, mean=1.0), r(16, dtype=torch.float32, seed=51)]

    def block(x, w1, b1, w2, b2, lw, lb):
        h = x + lean.gelu_mlp(lean.layer_norm_l2(x, lw, lb, 1e-5), w1, b1, w2, b2)
        return lean.layer_scale(h, lb)

    inputs = [x] + params
    ck = torch.autograd.grad(checkpoint(block, *inputs, use_reentrant=False).square().sum(), inputs)
    with dispatch.override(lean=False):
        plain = torch.autograd.grad(block(*inputs).square().sum(), inputs)
    for a, b in zip(ck, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
