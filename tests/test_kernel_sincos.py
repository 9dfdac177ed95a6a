"""kernels.sincos against ivfast.models.pos_embed.sincos_3d and diffloss.timestep_embedding.

The kernels run through Triton's interpreter on the CPU: TRITON_INTERPRET=1 is set before
triton or a kernel module is imported (triton decides at decoration time).

Tolerances (fp32 outputs; the reference table is float64 rounded to float32):
- sincos_3d: |kernel - ref| <= 2e-6 + 4e-7 * p_max, p_max the largest position. The kernel
  computes omega = exp2(i * -log2(1e4)/half) and p * omega in fp32; the exponent's
  rounding and exp2's (on CUDA the ~2-ulp hardware approximation) give a relative error of
  a few 1e-7 in the angle, i.e. ~p * 1e-7 absolute, plus ~1e-7 for sin/cos themselves.
- bf16 tables: one bf16 ulp of values in [-1, 1] (2^-8): the interpreter truncates
  fp32 -> bf16 (a GPU rounds to nearest, half of that).
- timestep_embedding: |kernel - ref| <= 1e-5 + 5e-7 * |t|_max. Both compute t * f in fp32
  with f = exp(i * c); an ulp of difference in exp (numpy or CUDA's approximation vs
  torch) is multiplied by t (up to 1000 -> 5e-4 absolute at most; ~6e-5 seen here).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402
import torch  # noqa: E402

import kernels.sincos as ks  # noqa: E402
from kernels import dispatch  # noqa: E402
from ivfast.models import diffloss, pos_embed  # noqa: E402





def _table_atol(t, h, w):
    return 2e-6 + 4e-7 * max(t, h, w)


@pytest.mark.parametrize(
    "dim,grid",
    [(16, (2, 3, 5)), (48, (3, 4, 4)), (80, (32, 1, 2)), (768, (2, 5, 6)), (1024, (1, 4, 9)), (1536, (3, 3, 4))],
)
def test_sincos_3d_table_matches_reference(dim, grid):
    out = ks.sincos_3d(dim, *grid, device="cpu")
    ref = pos_embed.sincos_3d(dim, *grid)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=_table_atol(*grid))


def test_sincos_3d_table_large_positions():
    # 32 frames and a 16 x 16 grid (the Stage-2 clip) at a small width: positions up to 31.
    out = ks.sincos_3d(32, 32, 16, 16, device="cpu")
    torch.testing.assert_close(out, pos_embed.sincos_3d(32, 32, 16, 16), rtol=0, atol=_table_atol(32, 16, 16))


def test_sincos_3d_table_bf16():
    out = ks.sincos_3d(64, 2, 3, 4, device="cpu", dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), pos_embed.sincos_3d(64, 2, 3, 4), rtol=0, atol=2.0 ** -8)


def test_sincos_3d_rejects_bad_dim():
    with pytest.raises(ValueError):
        ks.sincos_3d(40, 2, 2, 2, device="cpu")


@pytest.mark.parametrize("dim", [256, 7, 2])
@pytest.mark.parametrize("kind", ["int", "float"])
def test_timestep_embedding_matches_reference(dim, kind):
    g = torch.Generator().manual_seed(dim)
    if kind == "int":
        t = torch.randint(0, 1000, (37,), generator=g)
        t[0], t[-1] = 0, 999
    else:
        t = torch.rand(37, generator=g, dtype=torch.float64).float() * 1000.0
    out = ks.timestep_embedding(t, dim)
    ref = diffloss.timestep_embedding(t, dim)
    assert out.shape == ref.shape == (37, dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 + 5e-7 * float(t.abs().max()))


def test_timestep_embedding_max_period_and_shape():
    t = torch.arange(12).reshape(3, 4)  # any shape is flattened
    out = ks.timestep_embedding(t, 64, max_period=100.0)
    torch.testing.assert_close(out, diffloss.timestep_embedding(t, 64, 100.0), rtol=0, atol=1e-5 + 5e-7 * 11)


def test_timestep_embedding_in_autograd_graph():
    t = torch.randint(0, 1000, (5,))
    lin = torch.nn.Linear(32, 3)
    lin(ks.timestep_embedding(t, 32)).sum().backward()
    ref_lin = torch.nn.Linear(32, 3)
    ref_lin.load_state_dict(lin.state_dict())
    ref_lin(diffloss.timestep_embedding(t, 32)).sum().backward()
    torch.testing.assert_close(lin.weight.grad, ref_lin.weight.grad, rtol=0, atol=5 * (1e-5 + 5e-7 * 1000))


def test_timestep_embedding_differentiable_t_uses_reference():
    t = (torch.rand(4) * 10).requires_grad_()
    ks.timestep_embedding(t, 16).sum().backward()
    t2 = t.detach().clone().requires_grad_()
    diffloss.timestep_embedding(t2, 16).sum().backward()
    torch.testing.assert_close(t.grad, t2.grad)


class _NoLaunch:
    """Stands in for a Triton kernel: any launch fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched while the references should serve")


def test_disabled_dispatch_uses_reference(monkeypatch):
    monkeypatch.setattr(ks, "_timestep_kernel", _NoLaunch())
    monkeypatch.setattr(ks, "_sincos3d_table_kernel", _NoLaunch())
    dispatch.set_enabled(False)
    try:
        t = torch.arange(5)
        assert torch.equal(ks.timestep_embedding(t, 16), diffloss.timestep_embedding(t, 16))
        assert torch.equal(ks.sincos_3d(16, 1, 2, 3, device="cpu"), pos_embed.sincos_3d(16, 1, 2, 3))
    finally:
        dispatch.set_enabled(True)


# The subprocess check (CPU without TRITON_INTERPRET -> references) for this module is in
# tests/test_kernel_token_gather.py::test_cpu_without_interpreter_uses_reference (one
# interpreter start-up for the three kernel modules).
