"""Tile and grid choices for every kernel launch: pure functions of the shape and of ``gpu``.

``gpu`` is :func:`gpu_tiles` of the tensors' device: True for compiled kernels on a GPU,
False under Triton's interpreter, where every program costs ~1-2 ms, so the choice there is
few, large programs. The GPU tiles aim at ~4-8 float32 elements per thread, so that the kernels
compile without register spills; the adaLN elementwise and LayerNorm-backward tiles hold 16-32
(no spill, 8-16 resident warps per SM). ``python -m ivfast.compile_check`` compiles every
one of them for sm_80 and sm_90a and reports ptxas' figures (docs/design.md, "Tiles").

Every launcher goes through one pure function per kernel, beside it in its op's file
(``adaln.ln_mod_fwd_config`` etc.): (shape, dtype, flags, :class:`Target`) -> :class:`Launch`
(grid, num_warps, every constexpr), then :func:`run`. :func:`capture` records launches
instead of (or besides) running them; on ``meta`` tensors it stands for a :class:`Target`
(A100, H100): ``ivfast.ops.compile_check`` runs the real launchers that way, so the tiles it
compiles for sm_80 / sm_90a are the tiles the GPU gets.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

from ivfast.ops import dispatch
from ivfast.ops.dispatch import interpreting

# Interpreter tiles of the adaLN kernels (elements per tile, looping programs). Tests lower
# them to exercise multi-tile loops and masks.
INTERP_TILE_ELEMS = 16384
INTERP_PROGRAMS = 4


@dataclass(frozen=True)
class Target:
    """What a launch is planned for: ``gpu`` (compiled CUDA tiles, else the interpreter's), the SM
    count (programs of the looping backward kernels) and the compute capability x 10 (0: none)."""

    gpu: bool
    sms: int = 1
    arch: int = 0
    name: str = ""


INTERPRETER = Target(False, 1, 0, "interpreter")
A100 = Target(True, 108, 80, "A100")  # SXM4 80GB: 108 SMs, sm_80
H100 = Target(True, 132, 90, "H100")  # SXM5: 132 SMs, sm_90a
GPU_TARGETS = (A100, H100)


class _Capture:
    def __init__(self, target: Optional[Target], launch: bool):
        self.target, self.launch, self.records = target, launch, []


_captures: list = []  # the active capture() contexts, innermost last


def _meta_target(device: torch.device) -> Optional[Target]:
    if device.type == "meta" and _captures and _captures[-1].target is not None:
        return _captures[-1].target
    return None


def gpu_tiles(device: torch.device) -> bool:
    """Whether launches on ``device`` use the GPU's tiles (compiled kernels) or the interpreter's
    (``meta`` tensors under :func:`capture`: its target's)."""
    meta = _meta_target(device)
    if meta is not None:
        return meta.gpu
    return device.type == "cuda" and not interpreting()


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere): looping kernels launch a few per SM."""
    meta = _meta_target(device)
    if meta is not None:
        return meta.sms
    if device.type == "cuda":
        return _cuda_facts(device)[0]
    return 1


@functools.lru_cache(maxsize=None)
def _cuda_facts(device: torch.device) -> tuple[int, int]:
    """(SM count, compute capability as 10 major + minor) of a CUDA device, asked once: every
    launch plans with them."""
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, 10 * props.major + props.minor


def target(device: torch.device) -> Target:
    """The :class:`Target` of launches on ``device`` (from :func:`gpu_tiles` and :func:`sm_count`)."""
    meta = _meta_target(device)
    if meta is not None:
        return meta
    gpu = gpu_tiles(device)
    arch = _cuda_facts(device)[1] if gpu and device.type == "cuda" else 0
    return Target(gpu, sm_count(device), arch, "cuda" if gpu else "interpreter")


@dataclass(frozen=True)
class Launch:
    """One kernel launch as its launcher plans it: grid, num_warps and every constexpr."""

    grid: tuple
    num_warps: int
    constexprs: tuple  # ((name, value), ...) in the kernel's order
    scalars: tuple = ()  # ((name, value), ...): runtime arguments the plan fixes (e.g. rows per program)

    @classmethod
    def of(cls, grid, num_warps: int, scalars: tuple = (), **constexprs) -> "Launch":
        return cls(tuple(int(g) for g in grid), int(num_warps), tuple(constexprs.items()), tuple(scalars))

    def const(self, name: str):
        return dict(self.constexprs)[name]

    def scalar(self, name: str):
        return dict(self.scalars)[name]

    def options(self) -> dict:
        """The keyword arguments of the launch: constexprs and num_warps."""
        return {**dict(self.constexprs), "num_warps": self.num_warps}


class TensorArg(NamedTuple):
    """A tensor argument as :func:`capture` records it (the launch's JIT specialisation sees its
    dtype and whether its first element is 16-byte aligned)."""

    dtype: torch.dtype
    shape: tuple
    stride: tuple
    misalign: int  # storage offset in bytes mod 16 (allocations are aligned)


class Captured(NamedTuple):
    """A launch recorded by :func:`capture`: the kernel's name ("adaln.ln_mod_fwd"), its plan,
    its runtime arguments (tensors as :class:`TensorArg`, scalars as given, in the kernel's
    order), their names, and the kernel object (for compiling it)."""

    name: str
    launch: Launch
    args: tuple
    arg_names: tuple
    kernel: Any

    def key(self) -> tuple:
        """What identifies the launch (the kernel object left out)."""
        return self.name, self.launch, self.args


def _abstract(a):
    if torch.is_tensor(a):
        return TensorArg(a.dtype, tuple(a.shape), tuple(a.stride()), a.storage_offset() * a.element_size() % 16)
    return a


@contextlib.contextmanager
def capture(target: Optional[Target] = None, *, launch: bool = False):
    """Record every launch in the block (yields the list of :class:`Captured`).

    ``launch=False``: nothing runs (kernels see no data; the outputs stay empty). With ``target``,
    ``meta`` tensors take the kernels' launchers (``dispatch.use_triton``) planned for that target:
    the shapes of a whole step cost no memory and no time.
    """
    cap = _Capture(target, launch)
    _captures.append(cap)
    previous = dispatch.meta_launches(target is not None)
    try:
        yield cap.records
    finally:
        _captures.remove(cap)
        dispatch.meta_launches(previous)


def run(name: str, kernel, plan: Launch, *args) -> None:
    """``kernel[plan.grid](*args, **plan.options())``: every launch of ivfast.ops goes through here."""
    if _captures:
        rec = Captured(name, plan, tuple(_abstract(a) for a in args),
                       tuple(getattr(kernel, "arg_names", ())[:len(args)]), kernel)
        for cap in _captures:
            cap.records.append(rec)
        if not all(cap.launch for cap in _captures):
            return
    kernel[plan.grid](*args, **plan.options())


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def num_warps_for(tile: int) -> int:
    """About 8 elements per thread, 1 to 8 warps."""
    return max(1, min(8, tile // 256))


def least_padded(width: int, blocks) -> int:
    """The block of ``blocks`` that pads ``width`` to the fewest lanes (ties to the larger)."""
    return min(blocks, key=lambda b: (cdiv(width, b) * b, -b))


def rows_per_program(rows: int, block: int, budget: int, cap: int | None = None) -> int:
    """Rows of ``block`` elements in one program: ``rows`` rounded up to a power of two, at most
    ``budget`` elements (and ``cap`` rows), at least one."""
    n = min(next_pow2(rows), budget // block)
    return max(1, n if cap is None else min(n, cap))


def row_tile(rows: int, width: int, *, gpu: bool, max_tile: int = 2048, max_rows: int = 64) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_D) of a row-wise elementwise kernel over (rows, width).

    GPU: BLOCK_D is the power of two in [128, 1024] wasting the fewest masked lanes (768 -> 256,
    1536 -> 512, 1024 -> 1024, 588 -> 128), rows fill a ~``max_tile`` tile; with
    :func:`num_warps_for` ~8 elements per thread. Interpreter: the whole width and up to 64K
    elements per program.
    """
    if not gpu:
        bd = next_pow2(width)
        return rows_per_program(rows, bd, 65536, 256), bd
    bd = min(least_padded(width, (1024, 512, 256, 128)), next_pow2(width))
    return rows_per_program(rows, bd, max_tile, max_rows), bd


def column_loop_tile(rows: int, cols: int, *, gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) of a row-wise kernel that loops over column blocks.

    GPU: a column block of 512/256/128/64 with the least padding of C (ties to the larger;
    masked lanes still pay for Philox) and BLOCK_M * BLOCK_C = 512 over 4 warps: 4 elements per
    thread, as many as the Philox kernels hold without spilling. C = 588 gives 4 x 128.
    Interpreter: the whole row and up to 32K elements per program.
    """
    if gpu:
        block_c = least_padded(cols, (512, 256, 128, 64))
        return max(1, 512 // block_c), block_c, 4
    block_c = min(next_pow2(cols), 8192)
    return rows_per_program(rows, block_c, 32768), block_c, 4


def whole_row_tile(rows: int, width: int, *, gpu: bool, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of a LayerNorm-style kernel holding whole rows in registers.

    GPU: ~4K (forward) / ~2K (backward, more live tensors) float32 elements per tile, at most 16
    rows. Interpreter: up to ``INTERP_TILE_ELEMS`` elements per program.
    """
    block_n = next_pow2(width)
    if not gpu:
        return rows_per_program(rows, block_n, INTERP_TILE_ELEMS), block_n, 4
    block_m = max(1, min(16, (2048 if backward else 4096) // block_n))
    return block_m, block_n, 4 if block_n * block_m <= 2048 else 8


def elementwise_tile(rows: int, width: int, *, gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of a 2-D elementwise kernel: on a GPU the widest column tile
    (<= 1024) wasting at most 1/8 of a row on masked lanes, 4096 elements per tile."""
    if not gpu:
        block_n = next_pow2(width)
        return rows_per_program(rows, block_n, INTERP_TILE_ELEMS), block_n, 4
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
    return rows_per_program(rows, bd, budget, cap), bd


def norm_programs(rows: int, block_m: int, *, gpu: bool, sms: int) -> int:
    """Programs of the RMSNorm backward (each reduces a contiguous chunk of rows): 4 per SM on a
    GPU, 2 under the interpreter."""
    return max(1, min(cdiv(rows, block_m), 4 * sms if gpu else 2))
