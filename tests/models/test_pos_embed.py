import math

import numpy as np
import pytest
import torch

import torch.nn.functional as F

from ivfast.models.pos_embed import PositionTable, interpolate_time, resample_table
from ivfast.ops.sincos import sincos_1d, sincos_2d, sincos_3d


def reference_3d(dim, t, h, w):
    """Independent loop version of the 3-D table, written from the layout definition."""
    dt = dim // 4
    dx = (dim - dt) // 2  # x half, then y half of the same width
    out = np.zeros((t * h * w, dim))

    def enc(p, d, k):  # channel k of a d-wide 1-D block at position p
        half = d // 2
        i = k % half
        omega = 1.0 / 10000 ** (i / half)
        return math.sin(p * omega) if k < half else math.cos(p * omega)

    for ti in range(t):
        for y in range(h):
            for x in range(w):
                row = ti * h * w + y * w + x
                for c in range(dim):
                    if c < dt:
                        out[row, c] = enc(ti, dt, c)
                    elif c < dt + dx:
                        out[row, c] = enc(x, dx, c - dt)
                    else:
                        out[row, c] = enc(y, dx, c - dt - dx)
    return out


@pytest.mark.parametrize("dim,t,h,w", [(64, 3, 5, 7), (768, 2, 3, 4), (1024, 3, 2, 5), (16, 4, 1, 3)])
def test_sincos_3d_matches_reference(dim, t, h, w):
    table = sincos_3d(dim, t, h, w)
    assert table.shape == (t * h * w, dim) and table.dtype == torch.float32
    np.testing.assert_allclose(table.numpy(), reference_3d(dim, t, h, w), atol=1e-6)


def test_sincos_3d_layout():
    dim, t, h, w = 64, 3, 5, 7
    e = sincos_3d(dim, t, h, w).reshape(t, h * w, dim)
    dt = dim // 4
    # temporal block constant across space, spatial block constant across time
    assert torch.equal(e[:, :, :dt], e[:, :1, :dt].expand(-1, h * w, -1))
    assert torch.equal(e[:, :, dt:], e[:1, :, dt:].expand(t, -1, -1))
    # row 0 is position (0, 0, 0): sin halves 0, cos halves 1
    row0 = sincos_3d(dim, t, h, w)[0]
    expect = torch.cat([torch.zeros(dt // 2), torch.ones(dt // 2), torch.zeros(12), torch.ones(12), torch.zeros(12), torch.ones(12)])
    assert torch.equal(row0, expect)
    # moving one step in x changes only the x half, one step in y only the y half, one frame only temporal
    full = sincos_3d(dim, t, h, w)
    dx, dy, dtt = full[1] - full[0], full[w] - full[0], full[h * w] - full[0]
    xs, ys = slice(dt, dt + 24), slice(dt + 24, dim)
    assert dx[xs].abs().sum() > 0 and dx[:dt].abs().sum() == 0 and dx[ys].abs().sum() == 0
    assert dy[ys].abs().sum() > 0 and dy[:dt].abs().sum() == 0 and dy[xs].abs().sum() == 0
    assert dtt[:dt].abs().sum() > 0 and dtt[dt:].abs().sum() == 0


def test_sincos_2d_first_half_is_x():
    dim, h, w = 32, 4, 6
    e = sincos_2d(dim, h, w).reshape(h, w, dim)
    assert torch.equal(e[:, :, : dim // 2], e[:1, :, : dim // 2].expand(h, -1, -1))  # depends on x only
    assert torch.equal(e[:, :, dim // 2:], e[:, :1, dim // 2:].expand(-1, w, -1))  # depends on y only
    assert torch.allclose(e[0, :, : dim // 2], sincos_1d(dim // 2, w))


def test_sincos_1d_values():
    e = sincos_1d(8, torch.tensor([0.0, 2.5]))
    omega = 1.0 / 10000 ** (np.arange(4) / 4)
    np.testing.assert_allclose(e[1].numpy(), np.concatenate([np.sin(2.5 * omega), np.cos(2.5 * omega)]), atol=1e-6)
    with pytest.raises(ValueError):
        sincos_1d(7, 3)


@pytest.mark.parametrize("dim", [8, 24, 40, 100, 0])
def test_sincos_3d_rejects_bad_dim(dim):
    with pytest.raises(ValueError, match="divisible by 16"):
        sincos_3d(dim, 2, 2, 2)


def test_interpolate_time():
    h, w, d = 2, 3, 32
    table = torch.randn(4 * h * w, d)
    assert torch.equal(interpolate_time(table, 4, 4, h, w), table)
    up = interpolate_time(table, 4, 7, h, w)  # new frame 2j sits on old frame j
    assert up.shape == (7 * h * w, d)
    old, new = table.reshape(4, h * w, d), up.reshape(7, h * w, d)
    for j in range(4):
        torch.testing.assert_close(new[2 * j], old[j])
    torch.testing.assert_close(new[1], (old[0] + old[1]) / 2)
    up32 = interpolate_time(sincos_3d(d, 16, h, w), 16, 32, h, w).reshape(32, h * w, d)
    ref = sincos_3d(d, 16, h, w).reshape(16, h * w, d)
    torch.testing.assert_close(up32[0], ref[0])
    torch.testing.assert_close(up32[-1], ref[-1])
    # spatial block untouched by temporal interpolation
    torch.testing.assert_close(up32[:, :, d // 4:], ref[:1, :, d // 4:].expand(32, -1, -1))
    with pytest.raises(ValueError):
        interpolate_time(table, 3, 5, h, w)


def test_position_table_learnable_vs_fixed():
    fixed = PositionTable(32, 2, 3, 4, num_cls=2, learnable=False)
    learn = PositionTable(32, 2, 3, 4, num_cls=2, learnable=True)
    for p in (fixed, learn):
        out = p()
        assert out.shape == (2 + 24, 32)
        assert torch.equal(out[:2], torch.zeros(2, 32))
        assert torch.equal(p.patch, sincos_3d(32, 2, 3, 4))
        assert p.cls.shape == (2, 32)
    assert isinstance(learn.table, torch.nn.Parameter) and len(list(learn.parameters())) == 1
    assert list(learn.state_dict()) == ["table"]
    assert not isinstance(fixed.table, torch.nn.Parameter) and len(list(fixed.parameters())) == 0
    assert "table" in dict(fixed.named_buffers()) and len(fixed.state_dict()) == 0
    # fixed tables serve other grids on the fly; learnable ones refuse
    assert torch.equal(fixed.patch_rows_for(5, 3, 4), sincos_3d(32, 5, 3, 4))
    with pytest.raises(ValueError):
        learn.patch_rows_for(5, 3, 4)


def test_position_table_resize_time():
    learn = PositionTable(32, 4, 2, 2, num_cls=1, learnable=True)
    with torch.no_grad():
        learn.table[0] += 1.0
    before = learn.table.detach().clone()
    learn.resize_time(7)
    assert learn.grid == (7, 2, 2) and learn().shape == (1 + 28, 32)
    assert isinstance(learn.table, torch.nn.Parameter)
    torch.testing.assert_close(learn.cls, before[:1])
    torch.testing.assert_close(learn.patch.reshape(7, 4, 32)[::2], before[1:].reshape(4, 4, 32))
    fixed = PositionTable(32, 4, 2, 2, num_cls=1)
    fixed.resize_time(8)
    assert torch.equal(fixed.patch, sincos_3d(32, 8, 2, 2)) and len(fixed.state_dict()) == 0
    assert "table" in dict(fixed.named_buffers())


def test_position_table_resampled_per_call():
    """store_time_rows: the parameter keeps t stored frames; each call resamples them to the
    requested frames with align_corners=False (the release's Stage 2), differentiably."""
    learn = PositionTable(32, 8, 2, 3, num_cls=2, learnable=True)
    learn.store_time_rows(4)
    assert learn.grid == (4, 2, 3) and learn.resample_time and isinstance(learn.table, torch.nn.Parameter)
    assert learn.table.shape == (2 + 4 * 6, 32) and torch.equal(learn.patch, sincos_3d(32, 4, 2, 3))
    with torch.no_grad():
        learn.table.add_(torch.randn_like(learn.table))
    stored = learn.patch.detach().reshape(4, 6 * 32).t()[None]
    expect = F.interpolate(stored, size=8, mode="linear", align_corners=False)[0].t().reshape(8 * 6, 32)
    torch.testing.assert_close(learn.patch_rows_for(8, 2, 3), expect, rtol=0, atol=1e-6)
    assert torch.equal(learn.patch_rows_for(4, 2, 3), learn.patch)  # its own frames: the rows themselves
    full = learn((8, 2, 3))
    assert torch.equal(full[:2], learn.cls) and torch.equal(full[2:], learn.patch_rows_for(8, 2, 3))
    assert learn() is learn.table
    full.sum().backward()
    assert learn.table.grad.shape == learn.table.shape and torch.all(learn.table.grad[2:] > 0)
    with pytest.raises(ValueError, match="resamples time only"):
        learn.patch_rows_for(8, 3, 3)
    fixed = PositionTable(32, 8, 2, 3, num_cls=2)
    fixed.store_time_rows(4)  # fixed tables compute sincos for any grid: unchanged
    assert fixed.grid == (8, 2, 3) and len(fixed.state_dict()) == 0
    with pytest.raises(ValueError):
        learn.store_time_rows(0)


def test_resample_table_and_the_two_modes_at_16_to_32_frames():
    table = torch.cat([torch.randn(3, 32), torch.randn(4 * 6, 32)])
    for ac in (True, False):
        out = resample_table(table, 3, 9, 2, 3, align_corners=ac)
        assert torch.equal(out[:3], table[:3])
        torch.testing.assert_close(out[3:], interpolate_time(table[3:], 4, 9, 2, 3, align_corners=ac))
    with pytest.raises(ValueError):
        resample_table(table, 3, 9, 5, 5, align_corners=False)
    # at load (align_corners=True) vs per forward (False) on the sincos table, 16 -> 32 frames:
    # up to 0.21 apart (the highest temporal frequency); both keep the first and last frames
    sc = sincos_3d(64, 16, 2, 2)
    at_load = interpolate_time(sc, 16, 32, 2, 2, align_corners=True)
    per_forward = interpolate_time(sc, 16, 32, 2, 2, align_corners=False)
    diff = (at_load - per_forward).abs()
    assert diff.max().item() == pytest.approx(0.2096, abs=1e-3)
    assert diff.reshape(32, -1)[0].max() == 0 and diff.reshape(32, -1)[-1].max() == 0
