"""ivfast.ops.launch: the tile and grid choices are pure functions of the shape and ``gpu`` and keep
the properties their docstrings state (the kernels' tests run both sets of tiles)."""
import pytest
import torch

from ivfast.ops import launch as L


def test_helpers():
    assert [L.next_pow2(n) for n in (0, 1, 2, 3, 588, 1024, 1025)] == [1, 1, 2, 4, 1024, 1024, 2048]
    assert L.cdiv(19, 4) == 5 and L.cdiv(0, 4) == 0
    assert [L.num_warps_for(t) for t in (64, 256, 1024, 2048, 65536)] == [1, 1, 4, 8, 8]
    assert L.sm_count(torch.device("cpu")) == 1


def test_gpu_tiles_only_for_compiled_cuda(monkeypatch):
    assert not L.gpu_tiles(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not L.gpu_tiles(torch.device("cuda"))  # the interpreter's tiles, even for CUDA tensors
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert L.gpu_tiles(torch.device("cuda"))


@pytest.mark.parametrize("width,block_d", [(768, 256), (1536, 512), (1024, 1024), (588, 128), (40, 64), (3, 4)])
def test_row_tile_gpu(width, block_d):
    """BLOCK_D wastes the fewest masked lanes (at most the width's power of two); ~2K elements per tile."""
    bm, bd = L.row_tile(52224, width, gpu=True)
    assert bd == block_d and bm * bd <= 2048 and bm <= 64
    assert L.row_tile(1, width, gpu=True)[0] == 1


def test_row_tile_interpreter():
    assert L.row_tile(19, 588, gpu=False) == (32, 1024)  # the whole width, few programs
    assert L.row_tile(10 ** 6, 588, gpu=False) == (64, 1024)  # 64K elements per program


@pytest.mark.parametrize("cols,block_c", [(588, 128), (1024, 512), (768, 256), (5, 64), (3000, 64), (3072, 512)])
def test_column_loop_tile(cols, block_c):
    """GPU: the column block padding C least (ties to the larger), 512 elements over 4 warps."""
    bm, bc, warps = L.column_loop_tile(52224, cols, gpu=True)
    assert bc == block_c and bm * bc == 512 and warps == 4
    bm, bc, _ = L.column_loop_tile(37, cols, gpu=False)  # the whole row, up to 32K elements
    assert bc == min(L.next_pow2(cols), 8192) and bm * bc <= max(32768, bc) and bm <= 64


@pytest.mark.parametrize("width", [24, 588, 1536, 16384])
def test_whole_row_tile(width):
    bn = L.next_pow2(width)
    for backward, budget in ((False, 4096), (True, 2048)):
        bm, n, warps = L.whole_row_tile(52224, width, gpu=True, backward=backward)
        assert n == bn and 1 <= bm <= 16 and (bm == 1 or bm * bn <= budget) and warps in (4, 8)
    bm, n, _ = L.whole_row_tile(19, width, gpu=False, backward=True)
    assert n == bn and (bm == 1 or bm * bn <= L.INTERP_TILE_ELEMS)


@pytest.mark.parametrize("width,block_n", [(588, 128), (1536, 512), (1024, 1024), (768, 256), (24, 128)])
def test_elementwise_tile(width, block_n):
    """GPU: the widest column tile (<= 1024) wasting at most 1/8 of a row, 4096 elements."""
    bm, bn, _ = L.elementwise_tile(52224, width, gpu=True)
    assert bn == block_n and bm * bn == 4096


def test_looping_programs():
    assert L.looping_programs(1000, gpu=True, sms=132) == 528  # 4 per SM
    assert L.looping_programs(1000, gpu=True, sms=132, col_tiles=4) == 132  # shared by the column tiles
    assert L.looping_programs(10, gpu=True, sms=132) == 10
    assert L.looping_programs(1000, gpu=True, sms=1, col_tiles=8) == 1
    assert L.looping_programs(1000, gpu=False, sms=1) == L.INTERP_PROGRAMS


def test_norm_tile_and_programs():
    assert L.norm_tile(52224, 768, gpu=True) == (2, 1024) and L.norm_tile(52224, 96, gpu=True) == (16, 128)
    assert L.norm_tile(19, 588, gpu=False) == (32, 1024)
    assert L.norm_programs(52224, 2, gpu=True, sms=132) == 528 and L.norm_programs(3, 2, gpu=True, sms=132) == 2
    assert L.norm_programs(52224, 64, gpu=False, sms=1) == 2
