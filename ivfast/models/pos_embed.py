"""Position tables of video tokens: CLS rows, then the 3-D sine-cosine rows
(:func:`ivfast.ops.sincos.sincos_3d`), fixed or learnable, and their resampling in time."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ivfast.ops.sincos import sincos_3d


def interpolate_time(
    table: torch.Tensor, t_old: int, t_new: int, h: int, w: int, *, align_corners: bool = True
) -> torch.Tensor:
    """Linearly resample a (t_old*h*w, D) table along time to (t_new*h*w, D).

    With ``align_corners=True`` (default) new frame j sits at old time
    ``j * (t_old - 1) / (t_new - 1)``: the first and last frames keep their rows, and every
    new frame that lands on an old time gets that row exactly (e.g. 16 -> 31 keeps all 16).
    With ``align_corners=False`` frames are treated as cells (``F.interpolate``'s default).
    Keeps the input dtype; gradients flow through.
    """
    n_s = h * w
    if table.shape[0] != t_old * n_s:
        raise ValueError(f"table has {table.shape[0]} rows, expected t_old*h*w = {t_old * n_s}")
    if t_new == t_old:
        return table
    d = table.shape[-1]
    x = table.reshape(t_old, n_s * d).transpose(0, 1)[None]  # (1, n_s*d, t_old)
    compute = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    out = F.interpolate(compute, size=t_new, mode="linear", align_corners=align_corners if t_old > 1 else False)
    return out[0].transpose(0, 1).reshape(t_new * n_s, d).to(table.dtype)


def table_time_rows(shape, num_cls: int, patches_per_frame: int, dim: int | None = None) -> int:
    """The time rows ``t`` of a position table of ``shape`` (num_cls + t * patches_per_frame,
    ``dim`` or any width); ValueError when the shape is not one."""
    rows = shape[0] - num_cls if len(shape) == 2 and dim in (None, shape[1]) else -1
    if rows <= 0 or rows % patches_per_frame:
        raise ValueError(f"a table of shape {tuple(shape)} is not {num_cls} CLS rows + t x {patches_per_frame} "
                         "patch rows")
    return rows // patches_per_frame


def resample_table(table: torch.Tensor, num_cls: int, t_new: int, h: int, w: int, *,
                   align_corners: bool) -> torch.Tensor:
    """A whole (num_cls + t*h*w, D) table (e.g. a checkpoint's ``pos.table``) resampled in time to
    ``t_new`` frames by :func:`interpolate_time`, CLS rows kept; ``t`` is read from its row count.

    ``align_corners=False`` gives the rows a :class:`PositionTable` with ``resample_time`` uses
    in its forward, e.g. to export a Stage-2 encoder trained that way at its clip length.
    """
    t = table_time_rows(table.shape, num_cls, h * w)
    patch = interpolate_time(table[num_cls:], t, t_new, h, w, align_corners=align_corners)
    return torch.cat([table[:num_cls], patch], dim=0)


class PositionTable(nn.Module):
    """A (num_cls + t*h*w, dim) position table: CLS rows first (zero at init), then sincos_3d.

    ``learnable=True``: the table is a parameter ``table`` (in the state dict).
    ``learnable=False``: a fixed non-persistent buffer ``table`` (not in the state dict);
    :meth:`patch_rows_for` then also serves other grids by computing sincos on the fly.

    ``resample_time=True`` (learnable tables; :meth:`store_time_rows`): the parameter keeps its
    own time rows and a call for another frame count (same h, w) resamples them linearly in time
    with ``align_corners=False`` on every call (the release's Stage 2), the gradient flowing back
    to the stored rows. Without it a learnable table serves only its own grid.
    """

    def __init__(self, dim: int, t: int, h: int, w: int, num_cls: int = 0, learnable: bool = False,
                 resample_time: bool = False):
        super().__init__()
        self.dim, self.grid, self.num_cls, self.learnable = dim, (t, h, w), num_cls, learnable
        self.resample_time = resample_time
        init = self._initial()
        if learnable:
            self.table = nn.Parameter(init)
        else:
            self.register_buffer("table", init, persistent=False)

    def _initial(self) -> torch.Tensor:
        t, h, w = self.grid
        return torch.cat([torch.zeros(self.num_cls, self.dim), sincos_3d(self.dim, t, h, w)], dim=0)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Refill the table with its initial values (CLS rows zero, sincos patch rows)."""
        self.table.copy_(self._initial())

    def forward(self, grid: tuple[int, int, int] | None = None) -> torch.Tensor:
        """The whole (num_cls + t*h*w, dim) table: the stored one (``grid`` None or the table's own),
        or the CLS rows followed by :meth:`patch_rows_for` ``grid``. Call the module (not
        :meth:`patch_rows_for`) from outside a parent's forward, so that ZeRO-3 gathers ``table``."""
        if grid is None or tuple(grid) == self.grid:
            return self.table
        return torch.cat([self.cls, self.patch_rows_for(*grid).to(self.table.dtype)], dim=0)

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def patch(self) -> torch.Tensor:
        """The (t*h*w, dim) patch rows (no CLS rows)."""
        return self.table[self.num_cls:]

    @property
    def cls(self) -> torch.Tensor:
        """The (num_cls, dim) CLS rows."""
        return self.table[: self.num_cls]

    def patch_rows_for(self, t: int, h: int, w: int) -> torch.Tensor:
        """Patch rows for a (t, h, w) grid: the table's own rows for its grid; fixed tables
        compute sincos for any other grid; learnable ones with ``resample_time`` resample their
        stored time rows to ``t`` (``align_corners=False``, differentiable), otherwise raise
        (use :meth:`resize_time`)."""
        if (t, h, w) == self.grid:
            return self.patch
        if self.learnable:
            if self.resample_time and (h, w) == self.grid[1:]:
                return interpolate_time(self.patch, self.grid[0], t, h, w, align_corners=False)
            raise ValueError(
                f"learnable position table is for grid {self.grid}, input grid is {(t, h, w)}; "
                + ("it resamples time only, not the spatial grid"
                   if self.resample_time else "call resize_time() (time) or build the model for this size")
            )
        return sincos_3d(self.dim, t, h, w).to(device=self.table.device, dtype=self.table.dtype)

    @torch.no_grad()
    def store_time_rows(self, t: int) -> None:
        """Resample per call from ``t`` stored time rows (the release's Stage 2).

        A learnable table becomes a (num_cls + t*h*w, dim) parameter at its initial values (CLS
        rows zero, sincos for ``t`` frames; load the checkpoint's rows afterwards) with
        ``resample_time`` on, so that :meth:`patch_rows_for` serves any frame count from it. For
        a fixed table nothing changes (it computes sincos for any grid). Replaces the parameter
        object: call it before an optimiser holds the table.
        """
        if t < 1:
            raise ValueError(f"a position table needs at least one time row, got {t}")
        if not self.learnable:
            return
        _, h, w = self.grid
        self.resample_time = True
        if t == self.grid[0]:
            return
        self.grid = (t, h, w)
        old = self.table
        self.table = nn.Parameter(self._initial().to(device=old.device, dtype=old.dtype),
                                  requires_grad=old.requires_grad)

    @torch.no_grad()
    def resize_time(self, t_new: int, *, align_corners: bool = True) -> None:
        """Change the temporal length in place (e.g. 16 -> 32 frames for Stage 2).

        Learnable tables are linearly interpolated in time (CLS rows kept); fixed tables are
        recomputed as sincos for the new length.
        """
        t, h, w = self.grid
        if t_new == t:
            return
        if self.learnable:
            patch = interpolate_time(self.patch.detach(), t, t_new, h, w, align_corners=align_corners)
            self.table = nn.Parameter(torch.cat([self.cls.detach(), patch], dim=0))
        else:
            new = torch.cat([torch.zeros(self.num_cls, self.dim), sincos_3d(self.dim, t_new, h, w)], dim=0)
            self.table = new.to(device=self.table.device, dtype=self.table.dtype)
        self.grid = (t_new, h, w)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, grid={self.grid}, num_cls={self.num_cls}, learnable={self.learnable}"
                + (", resample_time=True" if self.resample_time else ""))
