"""Stage-1 masks that keep the same number of visible patches in every frame: the
teacher-guided semantic mask and the random tube mask.

A clip has N = T * L patch tokens, token n = t * L + l (frame-major). ``generator`` is one
``torch.Generator`` for the batch or a sequence of B (one per clip: clip b's mask then depends
only on generator b; the loop is over clips, never frames or tokens).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from ivfast.masks.base import MaskInfo

Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def num_visible_per_frame(L: int, ratio: float) -> int:
    """Visible patches per frame at mask ratio ``ratio``: L - int(L * ratio) (the release's rounding)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    return L - int(L * ratio)


def _per_clip_generators(generator: Generators, batch: int):
    if generator is None or isinstance(generator, torch.Generator):
        return None
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for a batch of {batch} clips")
    return gens


def _mask_from_frame_visible(vis: torch.Tensor, batch: int, frames: int, L: int) -> MaskInfo:
    """vis: (B*T, n_vis) visible patch indices per frame -> MaskInfo over T*L tokens."""
    mask = torch.ones(batch * frames, L, dtype=torch.bool, device=vis.device)
    mask.scatter_(1, vis, False)
    return MaskInfo.from_mask(mask.reshape(batch, frames * L))


def _sampling_weights(saliency: torch.Tensor) -> torch.Tensor:
    """(R, L) saliency -> strictly positive float64 weights for sampling without replacement.

    Rows that are all zero or hold a NaN, an infinity or a negative value become uniform.
    Zero entries of the other rows get a floor 1e-30 times the row's smallest positive
    weight: they are drawn only after every positive entry (the sequential-draw meaning of
    probability zero), in uniformly random order among themselves; without the floor,
    torch.multinomial would order zero-weight entries deterministically.
    """
    w = saliency.detach().to(torch.float64)
    bad = ~torch.isfinite(w).all(dim=1) | (w < 0).any(dim=1) | ~(w > 0).any(dim=1)
    w = torch.where(bad[:, None], torch.ones_like(w), w)
    w = w / w.sum(dim=1, keepdim=True)
    min_pos = torch.where(w > 0, w, torch.full_like(w, float("inf"))).amin(dim=1, keepdim=True)
    return torch.where(w > 0, w, min_pos * 1e-30)


def semantic_mask(
    saliency: torch.Tensor, batch: int, frames: int, ratio: float, generator: Generators = None
) -> MaskInfo:
    """Teacher-guided mask: per frame, patches drawn without replacement with probability
    proportional to ``saliency``; the first ``num_visible_per_frame(L, ratio)`` drawn are
    visible, the rest masked.

    saliency: (B*T, L), non-negative, rows ordered b-major then t (as the teacher's input).
    Only the first draws matter, so only those are drawn: their distribution is that of
    the first draws of a full permutation.
    """
    if saliency.dim() != 2 or saliency.shape[0] != batch * frames:
        raise ValueError(f"saliency must be (B*T, L) = ({batch * frames}, L), got {tuple(saliency.shape)}")
    L = saliency.shape[1]
    n_vis = num_visible_per_frame(L, ratio)
    w = _sampling_weights(saliency)
    gens = _per_clip_generators(generator, batch)
    if n_vis == 0:
        vis = torch.empty(batch * frames, 0, dtype=torch.long, device=saliency.device)
    elif gens is None:
        vis = torch.multinomial(w, n_vis, replacement=False, generator=generator)
    else:
        w = w.reshape(batch, frames, L)
        vis = torch.cat([torch.multinomial(w[b], n_vis, replacement=False, generator=g) for b, g in enumerate(gens)])
    return _mask_from_frame_visible(vis, batch, frames, L)


def tube_mask(
    batch: int, frames: int, L: int, ratio: float, device=None, generator: Generators = None
) -> MaskInfo:
    """Random tube mask: per clip one uniformly random set of ``num_visible_per_frame(L, ratio)``
    visible patches, the same in every frame."""
    n_vis = num_visible_per_frame(L, ratio)
    gens = _per_clip_generators(generator, batch)
    if gens is None:
        if generator is not None and device is None:
            device = generator.device
        noise = torch.rand(batch, L, generator=generator, device=device)
    else:
        if device is None:
            device = gens[0].device
        noise = torch.stack([torch.rand(L, generator=g, device=device) for g in gens])
    vis = noise.argsort(dim=1)[:, :n_vis]  # (B, n_vis): a uniformly random subset per clip
    vis = vis[:, None, :].expand(batch, frames, n_vis).reshape(batch * frames, n_vis)
    return _mask_from_frame_visible(vis, batch, frames, L)
