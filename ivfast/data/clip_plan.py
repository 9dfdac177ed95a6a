"""The random choices of one training clip, drawn before any frame is decoded (a GPU decoder
must know which frames to decode, and where to crop, before it starts)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ivfast.data.sampling import tsn_indices
from ivfast.data.transforms import DEFAULT_SCALES, multiscale_crop_params


@dataclass(frozen=True)
class ClipPlan:
    """Frames and geometry of one clip.

    ``indices``: int64 ``(num_frames,)`` frame numbers in the video (sorted, may repeat
    for a short video). ``y0, x0, crop_h, crop_w``: the crop window in the decoded frame,
    in pixels. ``flip``: mirror the crop horizontally.
    """

    indices: np.ndarray
    y0: int
    x0: int
    crop_h: int
    crop_w: int
    flip: bool


def plan_train_clip(
    num_total: int,
    height: int,
    width: int,
    num_frames: int,
    size: int,
    scales: Sequence[float] = DEFAULT_SCALES,
    flip: bool = True,
    rng: np.random.Generator | None = None,
    first_frame: int = 0,
    max_distort: int = 1,
) -> ClipPlan:
    """Draw a training clip's frames, crop and flip from ``rng``.

    The draws come in the PyAV path's order (``load_clip`` then ``train_transform``): the
    TSN indices, the multi-scale crop (pair, y offset, x offset), then one flip draw only
    when flipping is allowed. With ``rng = numpy.random.default_rng(sample_seed)`` both
    backends therefore take the same frames, crop and flip for the same (index, seed).

    ``num_total`` is the number of frames sampled from, starting at ``first_frame`` (a
    segment of a longer video): the indices are ``first_frame + tsn_indices(num_total,
    ...)``. ``flip`` says whether mirroring is allowed; the flip draw is skipped when not.
    """
    if rng is None:
        raise ValueError("plan_train_clip needs an rng (numpy.random.default_rng(sample_seed))")
    if first_frame < 0:
        raise ValueError(f"plan_train_clip: negative first_frame {first_frame}")
    indices = tsn_indices(num_total, num_frames, rng) + int(first_frame)
    y0, x0, ch, cw = multiscale_crop_params(height, width, size, scales, rng, max_distort)
    mirror = bool(flip) and bool(rng.random() < 0.5)
    return ClipPlan(indices=indices, y0=y0, x0=x0, crop_h=ch, crop_w=cw, flip=mirror)
