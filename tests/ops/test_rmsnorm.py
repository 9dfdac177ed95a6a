"""ivfast.ops.rmsnorm against its reference, forward and gradients (compiled on a GPU, else through
Triton's interpreter, with its tiles and the GPU's), and the cases that must take the reference."""
import pytest
import torch

from ivfast.ops import dispatch, launch
from ivfast.ops import rmsnorm as R
from tests.ops.common import DEVICE, NoLaunch, check_op, randn

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(1, 24), (7, 40), (2, 19, 588), (3, 5, 1536)]


def truth(x, w, eps):
    """The RMSNorm formula in x's dtype (float64 here; the reference computes in float32)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.to(x.dtype)


def args(shape, dtype, w_dtype=torch.float32, eps=1e-6, seed=0):
    x = randn(*shape, seed=seed, dtype=dtype, std=3.0)
    w = randn(shape[-1], seed=seed + 1, dtype=w_dtype, std=0.5, mean=1.0)
    return [x, w, eps]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rmsnorm(shape, dtype):
    out, (dx, dw) = check_op(R.rmsnorm, R.rmsnorm_ref, args(shape, dtype, seed=shape[-1]), truth=truth,
                             what=f"rmsnorm {shape}")
    assert out.dtype == dx.dtype == dtype and dw.dtype == torch.float32


@pytest.mark.parametrize("dtype,w_dtype,eps", [(torch.bfloat16, torch.bfloat16, 1e-2),
                                               (torch.float32, torch.float32, 4.0)])
def test_weight_dtype_and_eps(dtype, w_dtype, eps):
    """A bf16 weight (its gradient in bf16), and an eps as large as mean(x^2)."""
    check_op(R.rmsnorm, R.rmsnorm_ref, args((3, 11, 96), dtype, w_dtype, eps=eps, seed=4), truth=truth,
             what=f"eps {eps}")


@pytest.mark.parametrize("sms", [2, 132])
def test_gpu_tiles_in_interpreter(monkeypatch, sms):
    """The GPU's 2 x 1024 tiles for width 588; with 2 SMs each backward program loops over two
    row tiles and writes one partial weight gradient."""
    monkeypatch.setattr(launch, "gpu_tiles", lambda device: True)
    monkeypatch.setattr(launch, "sm_count", lambda device: sms)
    assert launch.norm_tile(38, 588, gpu=True) == (2, 1024)
    check_op(R.rmsnorm, R.rmsnorm_ref, args((2, 19, 588), torch.float32, seed=5), truth=truth,
             what=f"GPU tiles, {sms} SMs")


def test_strided_input_and_weight_and_deterministic_backward():
    x = randn(19, 2, 100, seed=13, grad=False).transpose(0, 1)[..., :96].requires_grad_()  # a (2, 19, 96) view
    w = randn(192, seed=14, grad=False, mean=1.0)[::2].requires_grad_()
    check_op(R.rmsnorm, R.rmsnorm_ref, [x, w, 1e-6], truth=truth, what="strided x and weight")
    y = R.rmsnorm(x, w)
    dy = randn(*y.shape, seed=15, grad=False)
    a = torch.autograd.grad(y, [x, w], dy, retain_graph=True)
    b = torch.autograd.grad(y, [x, w], dy)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_only_some_gradients_and_empty_rows():
    x, w, _ = args((4, 40), torch.float32, seed=16)
    check_op(R.rmsnorm, R.rmsnorm_ref, [x.detach(), w, 1e-6], truth=truth, what="weight gradient only")
    check_op(R.rmsnorm, R.rmsnorm_ref, [x, w.detach(), 1e-6], truth=truth, what="input gradient only")
    empty = torch.zeros(0, 40, device=DEVICE, requires_grad=True)
    y = R.rmsnorm(empty, w)
    assert y.shape == (0, 40)
    assert torch.equal(torch.autograd.grad(y.sum(), [w])[0], torch.zeros_like(w))


def test_argument_errors():
    with pytest.raises(ValueError):
        R.rmsnorm(torch.randn(2, 8), torch.ones(7))
    with pytest.raises(ValueError):
        R.rmsnorm(torch.randn(2, 8), torch.ones(1, 8))


def test_disabled_dispatch_takes_the_reference(monkeypatch):
    monkeypatch.setattr(R, "_rms_fwd_kernel", NoLaunch())
    monkeypatch.setattr(R, "_rms_bwd_kernel", NoLaunch())
    x, w, _ = args((4, 32), torch.float32)
    with dispatch.override(fused=False):
        y = R.rmsnorm(x, w)
        assert torch.equal(y, R.rmsnorm_ref(x, w))
        y.sum().backward()
