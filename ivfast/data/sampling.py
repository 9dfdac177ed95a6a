"""Sparse TSN frame sampling: one frame from each of ``num_segments`` equal segments of the video
(uniformly random when training, the middle one when evaluating)."""
from __future__ import annotations

import numpy as np

from ivfast.data.lists import UnreadableVideo


def tsn_indices(num_total: int, num_segments: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Frame indices, shape ``(num_segments,)``, dtype int64, sorted ascending.

    Segment ``k`` covers the integer frames ``[floor(k * L), floor((k + 1) * L))`` with
    ``L = num_total / num_segments``.

    * ``num_total >= num_segments`` (every segment holds at least one frame): with ``rng``
      (training) one frame is drawn uniformly from each segment; without ``rng``
      (evaluation) each segment's middle frame ``(start + end) // 2`` is taken (the upper
      middle for an even length; ``floor(k * L + L / 2)`` when L is an integer). The
      indices are then strictly increasing.
    * ``num_total < num_segments`` (a short video): the rule is the same for training and
      evaluation and uses no randomness: index ``k`` is ``floor(k * num_total /
      num_segments)``. The result is sorted, every frame of the video appears at least
      once, and frames repeat as evenly as possible (each ``floor`` or ``ceil`` of
      ``num_segments / num_total`` times).

    Raises ``ValueError`` when ``num_total <= 0`` or ``num_segments <= 0``.
    """
    num_total, num_segments = int(num_total), int(num_segments)
    if num_total <= 0:
        raise ValueError(f"tsn_indices: the video has no frames (num_total={num_total})")
    if num_segments <= 0:
        raise ValueError(f"tsn_indices: num_segments must be positive, got {num_segments}")
    k = np.arange(num_segments, dtype=np.int64)
    if num_total < num_segments:
        return (k * num_total) // num_segments
    # Integer arithmetic for the segment bounds: floor(k * N / S) exactly.
    starts = (k * num_total) // num_segments
    ends = ((k + 1) * num_total) // num_segments  # exclusive, > starts since N >= S
    if rng is None:
        return (starts + ends) // 2
    return rng.integers(starts, ends, dtype=np.int64)


def clip_indices(count: int, num_frames: int, rng: np.random.Generator | None, min_frames: int = 1) -> np.ndarray:
    """:func:`tsn_indices` of a clip sampled from ``count`` frames (a video's, a folder's, a
    shard member's); ``UnreadableVideo`` when ``count`` is below ``min_frames`` (``data.min_frames``)."""
    if count < min_frames:
        raise UnreadableVideo(f"too short: {count} frames, fewer than data.min_frames = {min_frames}")
    return tsn_indices(count, num_frames, rng)
