"""Stage-1 token masks: the teacher-guided semantic mask and the random tube mask.

A clip has N = T * L patch tokens, token n = t * L + l (frame-major). Every mask made here
keeps the same number of visible tokens in every frame, so every clip of a batch has the
same number of visible tokens and the encoder can run on a dense (B, N_vis, D) tensor.

Randomness: each function takes ``generator``, either one ``torch.Generator`` for the whole
batch or a sequence of B generators, one per clip (e.g. from
:class:`ivfast.models.sample_rng.SampleRNG`), in which case clip b's mask depends only on
its own generator (a loop over the clips of the batch, never over frames or tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

Generators = Union[torch.Generator, Sequence[torch.Generator], None]


@dataclass
class MaskInfo:
    """A batch of masks over N tokens.

    mask: (B, N) bool, True = masked. visible_idx: (B, N_vis) int64 and masked_idx:
    (B, N_mask) int64, each sorted ascending within its row; together they partition
    0..N-1 in every row.
    """

    mask: torch.Tensor
    visible_idx: torch.Tensor
    masked_idx: torch.Tensor

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "MaskInfo":
        """Build the index tensors of a (B, N) bool mask (True = masked).

        Every row must have the same number of visible tokens; a ValueError says otherwise.
        """
        if mask.dim() != 2:
            raise ValueError(f"mask must be (B, N), got shape {tuple(mask.shape)}")
        mask = mask.bool()
        n = mask.shape[1]
        n_vis_rows = (~mask).sum(dim=1)
        if mask.shape[0] > 0 and bool((n_vis_rows != n_vis_rows[0]).any()):
            raise ValueError(
                "MaskInfo needs the same number of visible tokens in every row; got per-row "
                f"counts {n_vis_rows.tolist()}"
            )
        n_vis = int(n_vis_rows[0]) if mask.shape[0] > 0 else n
        # A stable sort of 0 (visible) / 1 (masked) puts the visible indices first and keeps
        # both groups in ascending index order.
        order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
        return cls(mask=mask, visible_idx=order[:, :n_vis].contiguous(), masked_idx=order[:, n_vis:].contiguous())

    @property
    def num_visible(self) -> int:
        return self.visible_idx.shape[1]

    @property
    def num_masked(self) -> int:
        return self.masked_idx.shape[1]

    def to(self, device) -> "MaskInfo":
        return MaskInfo(self.mask.to(device), self.visible_idx.to(device), self.masked_idx.to(device))


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
