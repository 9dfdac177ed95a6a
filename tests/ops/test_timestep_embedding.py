"""ivfast.ops.timestep_embedding: the kernel against the float64 formula and the float32
reference (compiled on a GPU, else through Triton's interpreter with its tiles and the GPU's), and
the cases that take the reference. No backward: timesteps are integers."""
import math

import pytest
import torch

from ivfast.ops import dispatch, launch
from ivfast.ops import timestep_embedding as TE
from tests.ops.common import DEVICE, NoLaunch, check_op


def truth(t, dim, max_period=10000.0):
    """[cos(t f) | sin(t f)] (+ a zero column for odd dim), f_i = exp(-ln(max_period) i / (dim // 2)),
    in float64 from the float32 timesteps the reference embeds."""
    half = dim // 2
    f = torch.exp(torch.arange(half, dtype=torch.float64, device=t.device) * (-math.log(max_period) / max(half, 1)))
    a = t.reshape(-1).float().double()[:, None] * f[None, :]
    out = torch.cat([a.cos(), a.sin()], dim=-1)
    return torch.cat([out, out.new_zeros(out.shape[0], dim % 2)], dim=-1)


def timesteps(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "int":
        t = torch.randint(0, 1000, (n,), generator=g)
        t[0], t[-1] = 0, 999
        return t.to(DEVICE)
    return (torch.rand(n, generator=g, dtype=torch.float64) * 1000.0).to(DEVICE)


@pytest.mark.parametrize("dim", [256, 7, 2, 1])
@pytest.mark.parametrize("kind", ["int", "float"])
def test_matches_reference(dim, kind):
    t = timesteps(kind, 37, dim)
    out, _ = check_op(TE.timestep_embedding, TE.timestep_embedding_ref, [t, dim], truth=truth, what=f"dim {dim}")
    assert out.shape == (37, dim) and out.dtype == torch.float32


def test_max_period_and_any_shape():
    t = torch.arange(12, device=DEVICE).reshape(3, 4)  # flattened
    check_op(TE.timestep_embedding, TE.timestep_embedding_ref, [t, 64, 100.0], truth=truth, what="max_period 100")


def test_gpu_tiles_in_interpreter(monkeypatch):
    monkeypatch.setattr(launch, "gpu_tiles", lambda device: True)
    assert launch.row_tile(37, 588, gpu=True) == (16, 128)  # 588 wide: 128-column tiles waste least
    for dim in (256, 588):
        check_op(TE.timestep_embedding, TE.timestep_embedding_ref, [timesteps("int", 37, 3), dim], truth=truth,
                 what=f"GPU tiles, dim {dim}")


def test_differentiable_t_and_disabled_dispatch_take_the_reference(monkeypatch):
    monkeypatch.setattr(TE, "_timestep_kernel", NoLaunch())
    t = (torch.rand(4) * 10).requires_grad_()
    TE.timestep_embedding(t, 16).sum().backward()
    t2 = t.detach().clone().requires_grad_()
    TE.timestep_embedding_ref(t2, 16).sum().backward()
    assert torch.equal(t.grad, t2.grad)
    with dispatch.override(fused=False):
        t = torch.arange(5)
        assert torch.equal(TE.timestep_embedding(t, 16), TE.timestep_embedding_ref(t, 16))


def test_empty_and_bad_dim():
    assert TE.timestep_embedding(torch.zeros(0, dtype=torch.long, device=DEVICE), 8).shape == (0, 8)
    with pytest.raises(ValueError):
        TE.timestep_embedding(torch.arange(3), 0)
