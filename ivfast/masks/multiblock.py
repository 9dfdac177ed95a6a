"""V-JEPA multi-block masks for Stage 2: two views per clip, each a union of spatial blocks
that span every frame.

View 0 is the union of ``small_blocks`` rectangles of spatial area ``small_scale * h * w``
each; view 1 the union of ``large_blocks`` rectangles of area ``large_scale * h * w``. A token
is masked (a prediction target) when its spatial position lies inside any block of the view,
in every frame; the other tokens are visible (the student encoder's context).

How a block is drawn (per clip, per block, independently):
- aspect ratio ``a = height / width`` is **log-uniform** in ``aspect`` (``exp(U(log lo, log hi))``,
  so that tall and wide blocks are treated alike);
- height ``round(sqrt(area * a))`` and width ``round(sqrt(area / a))`` with
  ``area = scale * h * w``, each clamped to [1, grid side];
- top-left corner uniform over the positions where the block fits.

At least one visible and one masked token per clip and view: every block covers at least one
position, so some token is always masked. Blocks can cover the whole grid (two blocks of
scale 0.7 can); such a draw is **rejected and redrawn**: ``RETRIES`` candidate block sets are
drawn at once and the first one that leaves a visible position is used. If all of them cover
everything (vanishingly rare at the paper's settings), one random spatial position is
**unmasked** (in every frame): a clamp, so the function never loops.

Equal visible counts across the batch (``MaskInfo`` needs dense rows): the target count is
the smallest visible count of the batch, then capped by ``max_visible`` (> 0). Each clip
keeps a **uniformly random subset** of its visible tokens of that size; the others become
masked (prediction targets): tokens leave every frame alike, with no bias in time.

Randomness: one ``torch.Generator`` per clip (``SampleRNG.generators``); per clip a single
draw of all the uniforms its two views need (a fixed number, so the stream position never
depends on the outcome). Everything else is tensor ops over (clips, candidates, blocks,
positions); the only loop is over the clips of the batch, for their generators.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ivfast.masks.base import MaskInfo

RETRIES = 8  # candidate block sets drawn per clip and view (rejection sampling, then a clamp)


def block_sizes(u_aspect: torch.Tensor, scale: float, aspect: tuple[float, float], h: int, w: int):
    """Block heights and widths from uniforms in [0, 1): log-uniform aspect (height / width)."""
    lo, hi = math.log(aspect[0]), math.log(aspect[1])
    ratio = torch.exp(lo + (hi - lo) * u_aspect.double())
    area = scale * h * w
    bh = torch.round(torch.sqrt(area * ratio)).long().clamp(1, h)
    bw = torch.round(torch.sqrt(area / ratio)).long().clamp(1, w)
    return bh, bw


def sample_boxes(u: torch.Tensor, scale: float, aspect: tuple[float, float], h: int, w: int) -> torch.Tensor:
    """Boxes from uniforms ``u`` (..., 3) = (aspect, top, left) -> (..., 4) int64 ``(top, left, height, width)``.

    Top and left are uniform over the positions where the block fits: ``floor(u * (h - bh + 1))``.
    """
    bh, bw = block_sizes(u[..., 0], scale, aspect, h, w)
    top = (u[..., 1].double() * (h - bh + 1)).floor().long().clamp(max=h - bh)
    left = (u[..., 2].double() * (w - bw + 1)).floor().long().clamp(max=w - bw)
    return torch.stack([top, left, bh, bw], dim=-1)


def boxes_to_mask(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Union of boxes: (..., n_blocks, 4) -> (..., h, w) bool, True inside any box."""
    ys = torch.arange(h, device=boxes.device)
    xs = torch.arange(w, device=boxes.device)
    top, left, bh, bw = (boxes[..., i, None] for i in range(4))  # (..., nb, 1)
    in_y = (ys >= top) & (ys < top + bh)  # (..., nb, h)
    in_x = (xs >= left) & (xs < left + bw)  # (..., nb, w)
    return (in_y[..., :, None] & in_x[..., None, :]).any(dim=-3)


def _uniforms(generators: Sequence[torch.Generator], n: int, device) -> torch.Tensor:
    """(B, n) uniforms, row b from generator b (one draw per clip)."""
    return torch.stack([torch.rand(n, generator=g, device=device) for g in generators])


def _spatial_view(u: torch.Tensor, n_blocks: int, scale: float, aspect, h: int, w: int, u_fallback: torch.Tensor):
    """One view's spatial masks (B, h, w) from (B, RETRIES * n_blocks * 3) uniforms."""
    b = u.shape[0]
    boxes = sample_boxes(u.reshape(b, RETRIES, n_blocks, 3), scale, aspect, h, w)
    masks = boxes_to_mask(boxes, h, w)  # (B, R, h, w)
    ok = ~masks.flatten(2).all(dim=2)  # (B, R): leaves a visible position
    first = ok.int().argmax(dim=1)  # first acceptable candidate (0 if none)
    chosen = masks[torch.arange(b, device=u.device), first]  # (B, h, w)
    # Clamp: a clip whose every candidate covered the grid gets one random position unmasked.
    none_ok = ~ok.any(dim=1)
    free = torch.zeros_like(chosen.flatten(1)).scatter_(1, u_fallback.argmin(dim=1, keepdim=True), True)
    chosen = chosen & ~(free.view(b, h, w) & none_ok[:, None, None])
    return chosen


def equalise(mask: torch.Tensor, noise: torch.Tensor, max_visible: int = 0) -> torch.Tensor:
    """Give every row of a (B, N) mask (True = masked) the same number of visible tokens.

    The count is the smallest row's, capped by ``max_visible`` (> 0) but never below 1; each
    row keeps the visible tokens with the smallest ``noise`` (a uniformly random subset) and
    masks the rest.
    """
    n_vis = (~mask).sum(dim=1)
    target = int(n_vis.min())  # the one host sync: MaskInfo's row length
    if max_visible > 0:
        target = min(target, max_visible)
    target = max(target, 1)
    if bool((n_vis == target).all()):
        return mask
    score = torch.where(mask, torch.full_like(noise, 2.0), noise)  # masked tokens sort last
    keep = score.argsort(dim=1)[:, :target]
    return torch.ones_like(mask).scatter_(1, keep, False)


def multiblock_masks(
    batch: int,
    grid: tuple[int, int, int],
    generators: Sequence[torch.Generator],
    small_blocks: int = 8,
    small_scale: float = 0.15,
    large_blocks: int = 2,
    large_scale: float = 0.7,
    aspect: tuple[float, float] = (0.75, 1.5),
    max_visible: int = 0,
) -> list[MaskInfo]:
    """The two V-JEPA views of a batch: ``[small-block view, large-block view]``.

    grid (t, h, w): tokens ``n = ti*h*w + y*w + x``. generators: one per clip. Returns two
    :class:`MaskInfo` over ``t*h*w`` tokens (True = masked = predicted), each with the same
    visible count in every row (see the module docstring for the equalisation).
    """
    t, h, w = grid
    gens = list(generators)
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for a batch of {batch} clips")
    if batch == 0:
        raise ValueError("multiblock_masks needs at least one clip")
    lo, hi = aspect
    if not 0 < lo <= hi:
        raise ValueError(f"aspect range must satisfy 0 < min <= max, got {aspect}")
    for name, s in (("small_scale", small_scale), ("large_scale", large_scale)):
        if not 0.0 < s <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {s}")
    if small_blocks < 1 or large_blocks < 1:
        raise ValueError(f"block counts must be >= 1, got {small_blocks} and {large_blocks}")
    n = t * h * w
    views = ((small_blocks, small_scale), (large_blocks, large_scale))
    sizes = [RETRIES * nb * 3 for nb, _ in views] + [h * w] * 2 + [n] * 2
    u = _uniforms(gens, sum(sizes), gens[0].device).split(sizes, dim=1)
    box_u, fallback_u, drop_u = u[:2], u[2:4], u[4:6]
    out = []
    for (nb, scale), bu, fu, du in zip(views, box_u, fallback_u, drop_u):
        spatial = _spatial_view(bu, nb, scale, (lo, hi), h, w, fu)  # (B, h, w)
        mask = spatial.reshape(batch, 1, h * w).expand(batch, t, h * w).reshape(batch, n)
        out.append(MaskInfo.from_mask(equalise(mask, du, max_visible)))
    return out
