"""kernels.rmsnorm against its PyTorch reference (which equals ivfast.models.layers.RMSNorm).

The kernels run through Triton's interpreter on the CPU: TRITON_INTERPRET=1 is set before
triton or a kernel module is imported (triton decides at decoration time).

Expected values: the reference evaluated in float32 on float32 copies of the inputs (for
bf16 inputs: their exact values), differentiated by autograd. For ``add_rmsnorm`` in bf16
the new residual is first checked against x + residual, then the norm and all gradients are
checked against the fp32 reference evaluated on the kernel's own (bf16) new residual: the
kernel normalises the rounded sum, as the eager bf16 model does, and the interpreter
truncates where torch rounds, so the two roundings may differ by an ulp.

Tolerances:
- fp32: rtol 1e-5, atol 1e-5 for y, dx, dresidual (fp32 sums of D terms in another order,
  and rsqrt); dweight (a sum over rows) rtol 1e-5, atol 1e-4.
- bf16 outputs and input grads: rtol 2^-7 (one bf16 ulp: a single final rounding done in
  fp32; the interpreter truncates, a GPU rounds to nearest = half an ulp), atol 1e-5
  (x * rstd * w has no cancellation; dx = rstd * (w dy - xhat mean(w dy xhat)) can cancel,
  so atol 2^-7 * max|dx| for it).
- dweight with an fp32 weight: fp32 sums of the same products: rtol 1e-5, atol 1e-4; a
  bf16 weight adds one bf16 ulp (rtol 2^-7).
The backward is deterministic (per-program fp32 partials for dweight, summed by torch).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402
import torch  # noqa: E402

import kernels.rmsnorm as kr  # noqa: E402
from kernels import dispatch  # noqa: E402
from ivfast.models.layers import RMSNorm  # noqa: E402



BF16_RTOL = 2.0 ** -7

SHAPES = [(2, 37, 588), (2, 37, 768), (3, 5, 1024), (1, 37, 1536), (74, 40)]


def _f32(t):
    return t.detach().float().requires_grad_()


def _inputs(shape, dtype, w_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).mul(3).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(w_dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, dy, g


def _close(actual, expected, dtype, *, cancel=False):
    if dtype == torch.bfloat16:
        atol = BF16_RTOL * float(expected.abs().max()) if cancel else 1e-5
        torch.testing.assert_close(actual.float(), expected, rtol=BF16_RTOL, atol=atol)
    else:
        torch.testing.assert_close(actual.float(), expected, rtol=1e-5, atol=1e-5)


def _close_dw(actual, expected, w_dtype):
    rtol = 1e-5 + (BF16_RTOL if w_dtype == torch.bfloat16 else 0.0)
    torch.testing.assert_close(actual.float(), expected, rtol=rtol, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_equals_layers_rmsnorm(dtype):
    g = torch.Generator().manual_seed(0)
    m = RMSNorm(768, eps=1e-6)
    with torch.no_grad():
        m.weight.copy_(1 + 0.5 * torch.randn(768, generator=g))
    x = torch.randn(2, 9, 768, generator=g).to(dtype)
    assert torch.equal(kr.rmsnorm_reference(x, m.weight, m.eps), m(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rmsnorm(shape, dtype):
    x, w, dy, _ = _inputs(shape, dtype, torch.float32, seed=shape[-1])
    y = kr.rmsnorm(x, w, 1e-6)
    assert y.shape == x.shape and y.dtype == dtype
    dx, dw = torch.autograd.grad(y, [x, w], dy)
    xr, wr = _f32(x), _f32(w)
    yr = kr.rmsnorm_reference(xr, wr, 1e-6)
    rdx, rdw = torch.autograd.grad(yr, [xr, wr], dy.float())
    _close(y, yr, dtype)
    assert dx.dtype == dtype and dw.dtype == torch.float32
    _close(dx, rdx, dtype, cancel=True)
    _close_dw(dw, rdw, torch.float32)


def test_rmsnorm_bf16_weight_and_eps():
    x, w, dy, _ = _inputs((3, 11, 96), torch.bfloat16, torch.bfloat16, seed=4)
    y = kr.rmsnorm(x, w, 1e-2)
    dx, dw = torch.autograd.grad(y, [x, w], dy)
    xr, wr = _f32(x), _f32(w)
    yr = kr.rmsnorm_reference(xr, wr, 1e-2)
    rdx, rdw = torch.autograd.grad(yr, [xr, wr], dy.float())
    _close(y, yr, torch.bfloat16)
    _close(dx, rdx, torch.bfloat16, cancel=True)
    assert dw.dtype == torch.bfloat16
    _close_dw(dw, rdw, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_rmsnorm(shape, dtype):
    x, w, dy, g = _inputs(shape, dtype, torch.float32, seed=shape[-1] + 1)
    r = torch.randn(shape, generator=g).mul(3).to(dtype).requires_grad_()
    dh = torch.randn(shape, generator=g).to(dtype)
    y, h = kr.add_rmsnorm(x, r, w, 1e-6)
    assert y.dtype == h.dtype == dtype and y.shape == h.shape == x.shape
    dx, dr, dw = torch.autograd.grad([y, h], [x, r, w], [dy, dh])
    assert dx.dtype == dr.dtype == dtype and dw.dtype == torch.float32
    assert dx.data_ptr() != dr.data_ptr()
    # the new residual: x + r rounded once
    _close(h, x.detach().float() + r.detach().float(), dtype)
    # the norm of the kernel's new residual, and the gradients through it
    hr, wr = _f32(h), _f32(w)
    yr = kr.rmsnorm_reference(hr, wr, 1e-6)
    rdh, rdw = torch.autograd.grad(yr, [hr, wr], dy.float())
    _close(y, yr, dtype)
    _close(dx, rdh + dh.float(), dtype, cancel=True)
    _close(dr, rdh + dh.float(), dtype, cancel=True)
    _close_dw(dw, rdw, torch.float32)
    if dtype == torch.float32:  # and the whole thing against the reference function
        xr, rr, wr2 = _f32(x), _f32(r), _f32(w)
        yr2, hr2 = kr.add_rmsnorm_reference(xr, rr, wr2, 1e-6)
        ref = torch.autograd.grad([yr2, hr2], [xr, rr, wr2], [dy, dh])
        for a, e in zip((dx, dr, dw), ref):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)


def test_add_rmsnorm_bf16_against_eager_bf16():
    """Loose end-to-end check against the bf16 eager reference (both round h to bf16;
    a one-ulp difference in h moves y by up to ~2 ulps)."""
    x, w, dy, g = _inputs((2, 37, 768), torch.bfloat16, torch.float32, seed=11)
    r = torch.randn(x.shape, generator=g).mul(3).to(torch.bfloat16)
    y, h = kr.add_rmsnorm(x, r, w)
    yr, hr = kr.add_rmsnorm_reference(x, r, w)
    torch.testing.assert_close(h.float(), hr.float(), rtol=BF16_RTOL, atol=0)
    torch.testing.assert_close(y.float(), yr.float(), rtol=2 * BF16_RTOL, atol=1e-3)


def test_add_rmsnorm_mixed_dtypes_and_partial_use():
    # bf16 branch into an fp32 residual stream: new residual and output in fp32
    x, w, dy, g = _inputs((2, 37, 64), torch.bfloat16, torch.float32, seed=12)
    r = torch.randn(x.shape, generator=g).requires_grad_()
    y, h = kr.add_rmsnorm(x, r, w)
    yr, hr = kr.add_rmsnorm_reference(x, r, w)
    assert y.dtype == h.dtype == torch.float32
    torch.testing.assert_close(h, hr, rtol=0, atol=0)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    dx, dr = torch.autograd.grad(y.float().sum(), [x, r])
    rdx, rdr = torch.autograd.grad(yr.sum(), [x, r])
    assert dx.dtype == torch.bfloat16 and dr.dtype == torch.float32
    torch.testing.assert_close(dr, rdr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.float(), rdx.float(), rtol=BF16_RTOL, atol=BF16_RTOL * float(rdx.abs().max()))
    # only the new residual used: its gradient passes through, the weight gets zero
    y, h = kr.add_rmsnorm(x, r, w)
    dx, dr, dw = torch.autograd.grad(h.sum(), [x, r, w])
    assert torch.equal(dx, torch.ones_like(x)) and torch.equal(dr, torch.ones_like(r))
    assert torch.equal(dw, torch.zeros_like(w))
    # only the norm used
    y, h = kr.add_rmsnorm(x, r, w)
    dr = torch.autograd.grad((y * dy.float()).sum(), [r])[0]
    yr, _ = kr.add_rmsnorm_reference(x, r, w)
    torch.testing.assert_close(dr, torch.autograd.grad((yr * dy.float()).sum(), [r])[0], rtol=1e-5, atol=1e-5)


def test_non_contiguous_input_and_deterministic_backward():
    g = torch.Generator().manual_seed(13)
    base = torch.randn(37, 2, 100, generator=g)
    x = base.transpose(0, 1)[..., :96].requires_grad_()  # (2, 37, 96) view
    w = torch.randn(96, generator=g, requires_grad=True)
    y = kr.rmsnorm(x, w)
    yr = kr.rmsnorm_reference(x, w)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    dy = torch.randn(y.shape, generator=g)
    a = torch.autograd.grad(y, [x, w], dy, retain_graph=True)
    b = torch.autograd.grad(y, [x, w], dy)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    r = torch.autograd.grad(yr, [x, w], dy)
    torch.testing.assert_close(a[0], r[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[1], r[1], rtol=1e-5, atol=1e-4)


def test_argument_errors():
    with pytest.raises(ValueError):
        kr.rmsnorm(torch.randn(2, 8), torch.ones(7))
    with pytest.raises(ValueError):
        kr.add_rmsnorm(torch.randn(2, 8), torch.randn(3, 8), torch.ones(8))


class _NoLaunch:
    """Stands in for a Triton kernel: any launch fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched while the references should serve")


def test_disabled_dispatch_uses_reference(monkeypatch):
    monkeypatch.setattr(kr, "_rms_fwd_kernel", _NoLaunch())
    monkeypatch.setattr(kr, "_rms_bwd_kernel", _NoLaunch())
    dispatch.set_enabled(False)
    try:
        x, r, w = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32), torch.randn(32)
        y = kr.rmsnorm(x, w)
        assert torch.equal(y, kr.rmsnorm_reference(x, w))
        y.sum().backward()
        y2, h2 = kr.add_rmsnorm(x, r, w)
        yr2, hr2 = kr.add_rmsnorm_reference(x, r, w)
        assert torch.equal(y2, yr2) and torch.equal(h2, hr2)
    finally:
        dispatch.set_enabled(True)


# The subprocess check (CPU without TRITON_INTERPRET -> references) for this module is in
# tests/test_kernel_token_gather.py::test_cpu_without_interpreter_uses_reference (one
# interpreter start-up for the three kernel modules).
