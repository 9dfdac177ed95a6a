"""ivfast.ops.sincos: the fixed sine-cosine tables against their definition computed here entry by
entry, and their argument checks. The in-kernel formula ``sincos3d_at`` is tested through the
token-gather kernels (tests/ops/test_token_gather.py)."""
import math

import pytest
import torch

from ivfast.ops import sincos as S


def omega(i: int, half: int) -> float:
    return 10000.0 ** (-i / half)


def entry_3d(dim, h, w, row, col) -> float:
    """sincos_3d(dim, t, h, w)[row, col] from the layout: [temporal dim/4 | x 3dim/8 | y 3dim/8],
    each block [sin(p * omega) | cos(p * omega)]."""
    ti, rem = divmod(row, h * w)
    y, x = divmod(rem, w)
    dt = dim // 4
    hs = (dim - dt) // 2
    if col < dt:
        p, local, width = ti, col, dt
    elif col < dt + hs:
        p, local, width = x, col - dt, hs
    else:
        p, local, width = y, col - dt - hs, hs
    half = width // 2
    fn = math.sin if local < half else math.cos
    return fn(p * omega(local % half, half))


@pytest.mark.parametrize("dim,grid", [(16, (2, 3, 5)), (48, (3, 4, 4)), (32, (32, 2, 3))])
def test_sincos_3d_entries(dim, grid):
    table = S.sincos_3d(dim, *grid)
    assert table.shape == (grid[0] * grid[1] * grid[2], dim) and table.dtype == torch.float32
    want = torch.tensor([[entry_3d(dim, grid[1], grid[2], r, c) for c in range(dim)] for r in range(table.shape[0])],
                        dtype=torch.float64)
    assert torch.equal(table, want.float())  # float64 values rounded once


def test_sincos_1d_and_2d():
    pos = [0.0, 0.5, 3.25, 7.0]
    t1 = S.sincos_1d(8, pos)
    want = torch.tensor([[math.sin(p * omega(i, 4)) for i in range(4)] + [math.cos(p * omega(i, 4)) for i in range(4)]
                         for p in pos], dtype=torch.float64)
    assert torch.equal(t1, want.float())
    assert torch.equal(S.sincos_1d(8, 4), S.sincos_1d(8, torch.arange(4)))
    t2 = S.sincos_2d(16, 3, 5)  # row y*w + x: [x block | y block]
    assert torch.equal(t2[2 * 5 + 4], torch.cat([S.sincos_1d(8, [4])[0], S.sincos_1d(8, [2])[0]]))


def test_argument_checks():
    with pytest.raises(ValueError):
        S.sincos_1d(7, 3)
    with pytest.raises(ValueError):
        S.sincos_2d(10, 2, 2)
    for dim in (0, 40, 24):
        with pytest.raises(ValueError):
            S.sincos_3d(dim, 2, 2, 2)
    S.check_sincos_dim(64)


def test_tables_work_on_meta():
    """Torch ops only: a model built on the meta device can hold the table's shape."""
    with torch.device("meta"):
        assert S.sincos_3d(32, 2, 3, 4).shape == (24, 32)
