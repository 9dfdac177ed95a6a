"""Tile and grid choices for every kernel launch: pure functions of the shape and of ``gpu``.

``gpu`` is :func:`gpu_tiles` of the tensors' device: True for compiled kernels on a GPU,
False under Triton's interpreter, where every program costs ~1-2 ms, so the choice there is
few, large programs. The GPU tiles keep ~4-8 float32 elements per thread, so that the kernels
compile without register spills (docs/design.md has the ptxas figures).
"""
from __future__ import annotations

import torch

from ivfast.ops.dispatch import interpreting

# Interpreter tiles of the adaLN kernels (elements per tile, looping programs). Tests lower
# them to exercise multi-tile loops and masks.
INTERP_TILE_ELEMS = 16384
INTERP_PROGRAMS = 4


def gpu_tiles(device: torch.device) -> bool:
    """Whether launches on ``device`` use the GPU's tiles (compiled kernels) or the interpreter's."""
    return device.type == "cuda" and not interpreting()


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere): looping kernels launch a few per SM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def num_warps_for(tile: int) -> int:
    """About 8 elements per thread, 1 to 8 warps."""
    return max(1, min(8, tile // 256))


def row_tile(rows: int, width: int, *, gpu: bool, max_tile: int = 2048, max_rows: int = 64) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_D) of a row-wise elementwise kernel over (rows, width).

    GPU: BLOCK_D is the power of two in [128, 1024] wasting the fewest masked lanes (768 -> 256,
    1536 -> 512, 1024 -> 1024, 588 -> 128), rows fill a ~``max_tile`` tile; with
    :func:`num_warps_for` ~8 elements per thread. Interpreter: the whole width and up to 64K
    elements per program.
    """
    if not gpu:
        bd = next_pow2(width)
        return max(1, min(next_pow2(rows), max(1, 65536 // bd), 256)), bd
    best = None
    for bd in (1024, 512, 256, 128):
        waste = cdiv(width, bd) * bd / width
        if best is None or waste < best[0] - 1e-9:
            best = (waste, bd)
    bd = min(best[1], next_pow2(width))
    return max(1, min(max_rows, max_tile // bd, next_pow2(rows))), bd


def column_loop_tile(rows: int, cols: int, *, gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) of a row-wise kernel that loops over column blocks.

    GPU: a column block of 512/256/128/64 with the least padding of C (ties to the larger;
    masked lanes still pay for Philox) and BLOCK_M * BLOCK_C = 512 over 4 warps: 4 elements per
    thread, as many as the Philox kernels hold without spilling. C = 588 gives 4 x 128.
    Interpreter: the whole row and up to 32K elements per program.
    """
    if gpu:
        block_c = min((512, 256, 128, 64), key=lambda b: (cdiv(cols, b) * b, -b))
        return max(1, 512 // block_c), block_c, 4
    block_c = min(next_pow2(cols), 8192)
    return max(1, min(next_pow2(rows), 32768 // block_c)), block_c, 4


def whole_row_tile(rows: int, width: int, *, gpu: bool, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of a LayerNorm-style kernel holding whole rows in registers.

    GPU: ~4K (forward) / ~2K (backward, more live tensors) float32 elements per tile, at most 16
    rows. Interpreter: up to ``INTERP_TILE_ELEMS`` elements per program.
    """
    block_n = next_pow2(width)
    if not gpu:
        return max(1, min(next_pow2(rows), INTERP_TILE_ELEMS // block_n)), block_n, 4
    block_m = max(1, min(16, (2048 if backward else 4096) // block_n))
    return block_m, block_n, 4 if block_n * block_m <= 2048 else 8


def elementwise_tile(rows: int, width: int, *, gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of a 2-D elementwise kernel: on a GPU the widest column tile
    (<= 1024) wasting at most 1/8 of a row on masked lanes, 4096 elements per tile."""
    if not gpu:
        block_n = next_pow2(width)
        return max(1, min(next_pow2(rows), INTERP_TILE_ELEMS // block_n)), block_n, 4
    block_n = 128
    for bn in (1024, 512, 256):
        if bn <= next_pow2(width) and cdiv(width, bn) * bn - width <= width // 8:
            block_n = bn
            break
    return max(1, 4096 // block_n), block_n, 4


def looping_programs(num_tiles: int, *, gpu: bool, sms: int, col_tiles: int = 1) -> int:
    """Programs along rows for a kernel whose programs loop over row tiles and each write one
    partial reduction row: 4 per SM (shared by the column tiles) on a GPU."""
    if not gpu:
        return max(1, min(num_tiles, INTERP_PROGRAMS))
    return max(1, min(num_tiles, (4 * sms) // col_tiles))


def norm_tile(rows: int, width: int, *, gpu: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D) of the RMSNorm kernels: one block spans the row; rows fill a ~2K tile on
    a GPU (with :func:`num_warps_for`, ~8 elements per thread), up to 64K elements and 256 rows
    under the interpreter."""
    bd = next_pow2(width)
    budget, cap = (2048, 16) if gpu else (65536, 256)
    return max(1, min(next_pow2(rows), budget // bd, cap)), bd


def norm_programs(rows: int, block_m: int, *, gpu: bool, sms: int) -> int:
    """Programs of the RMSNorm backward (each reduces a contiguous chunk of rows): 4 per SM on a
    GPU, 2 under the interpreter."""
    return max(1, min(cdiv(rows, block_m), 4 * sms if gpu else 2))
