"""V-JEPA multi-block masks for Stage 2: two views per clip, each a union of spatial blocks
that span every frame, then an equal visible count across the batch.

View 0 is the union of ``small_blocks`` rectangles of spatial area ``small_scale * h * w``
each; view 1 the union of ``large_blocks`` rectangles of area ``large_scale * h * w``. A token
``n = t*h*w + y*w + x`` is masked (a prediction target) when ``(y, x)`` lies inside any block
of the view; the other tokens are visible (the student encoder's context). Before the
equalisation every frame of a clip carries the same spatial mask.

Block size (``block_shape``), from a uniform ``u`` in [0, 1) and the range ``aspect = (lo, hi)``
of ``a = height / width``:

- ``"release"`` (default; V-JEPA's and the release's draw): ONE size per call (the local batch)
  shared by every clip, block and retry of the call and by both views; ``a = lo + u (hi - lo)``
  (uniform), area ``A = int(h * w * scale)`` (truncated to whole tokens), height
  ``round(sqrt(A a))``, width ``round(sqrt(A / a))``. Both views use the same ``u`` because the
  release seeds the two views' size generators alike (with the iteration counter).
- ``"log_uniform"``: a size per block; ``a = exp(log lo + u (log hi -
  log lo))`` (tall and wide treated alike), ``A = scale * h * w`` (not truncated).

Either way each side is rounded half-to-even (Python's and torch's ``round``) and clamped to
[1, grid side], and the top-left corner is uniform over the positions where the block fits.

Where the batch's one size comes from: ``u = frac(sum_b u_b)`` over one fixed uniform ``u_b``
of each clip's own stream. It is exactly uniform (one independent uniform term suffices),
exact in floating point (``torch.rand`` gives multiples of 2**-24, so the sum and its fraction
are exact on any device and in any reduction order), reproducible and resumable like every
per-clip draw, and independent of the ORDER of the clips: permuting the generators permutes
the masks' rows. What the release mode gives up is a clip's independence of the OTHER clips of
its batch: change the batch and the shared size changes. (The release draws the size from a
generator seeded with the iteration counter, restarted each epoch, so every rank uses the same
size at a step, where ivfast's ranks each draw their own; and it draws positions from the
global torch RNG, so its masks are not reproducible per clip at all.)

At least one visible and one masked token per clip and view: every block covers at least one
position, so some token is always masked. Blocks can cover the whole grid (two blocks of
scale 0.7 can); such a draw is **rejected and redrawn**: ``RETRIES`` candidate block sets are
drawn at once (same sizes, new positions) and the first one that leaves a visible position is
used; this is the release's ``while empty_context`` redraw without its unbounded loop. If all
of them cover everything (vanishingly rare at the paper's settings), one random spatial
position is **unmasked** (in every frame): a clamp, so the function never loops.

Equal visible counts across the batch (``MaskInfo`` needs dense rows; ``equalise``): the target
count is the smallest visible count of the batch, capped by ``max_visible`` (> 0; the release's
``max_keep = int(400 * frames / 8)``), at least 1. The clip's other visible tokens become
masked (prediction targets):

- ``"release"`` (default): each clip keeps its FIRST visible tokens in token order, i.e. in
  time order. At 32 frames, 16 x 16 tokens and a cap of 1600 the kept context usually ends
  part-way through the clip, and the later frames have no visible token at all (about half of
  them; docs/design.md gives the measured shares): the model
  learns to predict later frames from earlier ones as well as to in-fill. That is how the
  published models were trained, hence the default.
- ``"random"``: each clip keeps a uniformly random subset of its visible tokens (the smallest
  ``noise``): tokens leave every frame alike, with no bias in time; pure in-filling.

Randomness: one ``torch.Generator`` per clip (``SampleRNG.generators``); per clip a single
draw of all the uniforms its two views could need, the same fixed number in every mode, so the
stream position never depends on the outcome or the mode (the spatial masks of a clip are the
same under both ``equalise`` modes). Everything else is tensor ops over (clips, candidates,
blocks, positions); the only loop is over the clips of the batch, for their generators.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ivfast.masks.base import MaskInfo

RETRIES = 8  # candidate block sets drawn per clip and view (rejection sampling, then a clamp)
BLOCK_SHAPES = ("release", "log_uniform")
EQUALISE = ("release", "random")


def block_sizes(u_aspect: torch.Tensor, scale: float, aspect: tuple[float, float], h: int, w: int,
                shape: str = "release"):
    """Block heights and widths from uniforms in [0, 1) (see the module docstring for ``shape``)."""
    u = u_aspect.double()
    if shape == "release":  # aspect uniform, area truncated to whole tokens
        ratio = aspect[0] + u * (aspect[1] - aspect[0])
        area = float(int(h * w * scale))
    elif shape == "log_uniform":  # aspect log-uniform, area not truncated
        lo, hi = math.log(aspect[0]), math.log(aspect[1])
        ratio = torch.exp(lo + (hi - lo) * u)
        area = scale * h * w
    else:
        raise ValueError(f"block_shape must be one of {BLOCK_SHAPES}, got {shape!r}")
    bh = torch.round(torch.sqrt(area * ratio)).long().clamp(1, h)
    bw = torch.round(torch.sqrt(area / ratio)).long().clamp(1, w)
    return bh, bw


def sample_boxes(u: torch.Tensor, scale: float, aspect: tuple[float, float], h: int, w: int,
                 shape: str = "release") -> torch.Tensor:
    """Boxes from uniforms ``u`` (..., 3) = (aspect, top, left) -> (..., 4) int64 ``(top, left, height, width)``.

    Top and left are uniform over the positions where the block fits: ``floor(u * (h - bh + 1))``.
    """
    bh, bw = block_sizes(u[..., 0], scale, aspect, h, w, shape)
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


def batch_uniform(u: torch.Tensor) -> torch.Tensor:
    """The batch's one uniform from one uniform per clip: ``frac(sum_b u_b)``, a 0-dim tensor.

    Exactly uniform, exact in floating point and independent of the clips' order (see the
    module docstring); returned in ``u``'s dtype (a multiple of 2**-24 stays exact in float32).
    """
    return u.double().sum().frac().to(u.dtype)


def _spatial_view(u: torch.Tensor, n_blocks: int, scale: float, aspect, h: int, w: int, u_fallback: torch.Tensor,
                  shape: str = "release", u_shared: torch.Tensor | None = None):
    """One view's spatial masks (B, h, w) from (B, RETRIES * n_blocks * 3) uniforms.

    ``u_shared`` (0-dim): the batch's aspect uniform, replacing every block's own one (release shape).
    """
    b = u.shape[0]
    u = u.reshape(b, RETRIES, n_blocks, 3)
    if u_shared is not None:
        u = torch.cat([u_shared.to(u.dtype).expand(b, RETRIES, n_blocks, 1), u[..., 1:]], dim=-1)
    boxes = sample_boxes(u, scale, aspect, h, w, shape)
    masks = boxes_to_mask(boxes, h, w)  # (B, R, h, w)
    ok = ~masks.flatten(2).all(dim=2)  # (B, R): leaves a visible position
    first = ok.int().argmax(dim=1)  # first acceptable candidate (0 if none)
    chosen = masks[torch.arange(b, device=u.device), first]  # (B, h, w)
    # Clamp: a clip whose every candidate covered the grid gets one random position unmasked.
    none_ok = ~ok.any(dim=1)
    free = torch.zeros_like(chosen.flatten(1)).scatter_(1, u_fallback.argmin(dim=1, keepdim=True), True)
    chosen = chosen & ~(free.view(b, h, w) & none_ok[:, None, None])
    return chosen


def equalise_visible(mask: torch.Tensor, noise: torch.Tensor, max_visible: int = 0,
                     how: str = "release") -> torch.Tensor:
    """Give every row of a (B, N) mask (True = masked) the same number of visible tokens.

    The count is the smallest row's, capped by ``max_visible`` (> 0) but never below 1; each
    row keeps, of its visible tokens, the first ones in token order (``how="release"``; ``noise``
    unused) or the ones with the smallest ``noise`` (``"random"``: a uniformly random subset),
    and masks the rest.
    """
    if how not in EQUALISE:
        raise ValueError(f"equalise must be one of {EQUALISE}, got {how!r}")
    n_vis = (~mask).sum(dim=1)
    target = int(n_vis.min())  # the one host sync: MaskInfo's row length
    if max_visible > 0:
        target = min(target, max_visible)
    target = max(target, 1)
    if bool((n_vis == target).all()):
        return mask
    if how == "release":  # rank of each visible token in token order (1-based); keep ranks <= target
        return mask | ((~mask).cumsum(dim=1) > target)
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
    equalise: str = "release",
    block_shape: str = "release",
) -> list[MaskInfo]:
    """The two V-JEPA views of a batch: ``[small-block view, large-block view]``.

    grid (t, h, w): tokens ``n = ti*h*w + y*w + x``. generators: one per clip. Returns two
    :class:`MaskInfo` over ``t*h*w`` tokens (True = masked = predicted), each with the same
    visible count in every row. ``equalise`` ("release" | "random") and ``block_shape``
    ("release" | "log_uniform"): see the module docstring.
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
    if equalise not in EQUALISE:
        raise ValueError(f"equalise must be one of {EQUALISE}, got {equalise!r}")
    if block_shape not in BLOCK_SHAPES:
        raise ValueError(f"block_shape must be one of {BLOCK_SHAPES}, got {block_shape!r}")
    n = t * h * w
    views = ((small_blocks, small_scale), (large_blocks, large_scale))
    sizes = [RETRIES * nb * 3 for nb, _ in views] + [h * w] * 2 + [n] * 2
    u = _uniforms(gens, sum(sizes), gens[0].device).split(sizes, dim=1)
    box_u, fallback_u, drop_u = u[:2], u[2:4], u[4:6]
    # Release shape: one aspect uniform for the batch and both views, from each clip's first one.
    shared = batch_uniform(box_u[0][:, 0]) if block_shape == "release" else None
    out = []
    for (nb, scale), bu, fu, du in zip(views, box_u, fallback_u, drop_u):
        spatial = _spatial_view(bu, nb, scale, (lo, hi), h, w, fu, block_shape, shared)  # (B, h, w)
        mask = spatial.reshape(batch, 1, h * w).expand(batch, t, h * w).reshape(batch, n)
        out.append(MaskInfo.from_mask(equalise_visible(mask, du, max_visible, equalise)))
    return out
