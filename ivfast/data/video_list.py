"""Videos named in a list file, decoded with PyAV, sampled with TSN segments.

List file format, one video per line, fields separated by whitespace::

    # comment lines and blank lines are skipped
    relative/or/absolute/path.mp4 12
    another_video.webm             # no label: the label is 0

* 1 field: a path, label 0 (for unlabelled pretraining data);
* 2 fields: a path and an integer label >= 0;
* anything else (3+ fields, a label that is not a non-negative integer) is malformed and
  raises ``ValueError`` naming the list file and the 1-based line number. Paths therefore
  cannot contain whitespace. A relative path is joined to ``root``.

``VideoListDataset.__getitem__((index, seed))`` opens the video inside the call (safe in
DataLoader workers: nothing decoded or opened is kept on the dataset), so every worker has
its own file handles. An unreadable sample (missing or empty file, not a video, no video
stream, zero frames, a decoding error) logs one warning on the ``"ivfast.data"`` logger
naming the file and the reason and returns ``None``; the dataset never retries and never
substitutes another index. An ``index`` out of range is a caller bug and raises
``IndexError``.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
from torch.utils.data import Dataset

from ivfast.data.sampling import tsn_indices
from ivfast.data.transforms import DEFAULT_SCALES, IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

logger = logging.getLogger("ivfast.data")


def read_video_list(path: str, root: str = "") -> list[tuple[str, int]]:
    """Parse a list file into ``[(video_path, label), ...]``; see the module docstring."""
    out: list[tuple[str, int]] = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) > 2:
                raise ValueError(
                    f"{path}:{lineno}: malformed line {line!r}: expected 'path [label]', got {len(fields)} fields"
                )
            label = 0
            if len(fields) == 2:
                try:
                    label = int(fields[1])
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: malformed line {line!r}: label {fields[1]!r} is not an integer") from None
                if label < 0:
                    raise ValueError(f"{path}:{lineno}: malformed line {line!r}: negative label {label}")
            video = fields[0]
            if root and not os.path.isabs(video):
                video = os.path.join(root, video)
            out.append((video, label))
    return out


class _Unreadable(Exception):
    """A video that cannot give a clip; the message is the reason logged."""


def _open(path: str):
    import av  # imported lazily: the synthetic data path needs no PyAV

    if not os.path.exists(path):
        raise _Unreadable("file not found")
    if os.path.getsize(path) == 0:
        raise _Unreadable("empty file")
    container = av.open(path)
    if not container.streams.video:
        container.close()
        raise _Unreadable("no video stream")
    # Single-threaded decoding: the parallelism comes from DataLoader workers, and a codec
    # context with FFmpeg slice/frame threads that is still alive (e.g. in an uncollected
    # reference cycle) when a worker is forked deadlocks the worker when it frees it.
    stream = container.streams.video[0]
    stream.codec_context.thread_count = 1
    stream.thread_type = "NONE"
    return container


def _count_frames(path: str) -> int:
    """The number of frames, counted by decoding the whole video stream."""
    with _open(path) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


def _decode_at(path: str, indices: np.ndarray) -> tuple[np.ndarray | None, int]:
    """Decode frames ``0 .. max(indices)`` in order, keep those at ``indices`` as RGB uint8.

    Returns ``((T, H, W, 3) uint8, n)`` when every index was reached, else ``(None, n)``
    with ``n`` the number of frames the stream actually held.
    """
    last = int(indices[-1])
    wanted = set(int(i) for i in indices)
    got: dict[int, np.ndarray] = {}
    n = 0
    with _open(path) as container:
        for frame in container.decode(container.streams.video[0]):
            if n in wanted:
                got[n] = frame.to_ndarray(format="rgb24")
            n += 1
            if n > last:
                break
    if n <= last:
        return None, n
    return np.stack([got[int(i)] for i in indices]), n


def load_clip(path: str, num_frames: int, rng: np.random.Generator | None, seed: int | None = None) -> np.ndarray:
    """TSN-sampled RGB uint8 frames ``(num_frames, H, W, 3)`` of one video.

    The frame count comes from the stream header, or from a decoding pass when the header
    has none. If the header overstates it (decoding ends before the last sampled frame,
    e.g. a truncated Matroska file), the indices are drawn again on the true count (with a
    fresh ``default_rng(seed)`` when training) and decoded once more: at most two passes.
    Raises ``_Unreadable`` or a PyAV / OS error on failure.
    """
    with _open(path) as container:
        total = int(container.streams.video[0].frames or 0)
    counted = total <= 0
    if counted:
        total = _count_frames(path)
    if total <= 0:
        raise _Unreadable("zero frames")
    indices = tsn_indices(total, num_frames, rng)
    frames, n = _decode_at(path, indices)
    if frames is not None:
        return frames
    if n <= 0:
        raise _Unreadable("zero decodable frames")
    if counted:  # the count came from decoding; a shorter second decode is not a clean video
        raise _Unreadable(f"decoding is not repeatable ({total} frames counted, then {n})")
    logger.info("%s: the header says %d frames but only %d decode; sampling from %d", path, total, n, n)
    if rng is not None:
        rng = np.random.default_rng(seed)
    indices = tsn_indices(n, num_frames, rng)
    frames, n2 = _decode_at(path, indices)
    if frames is None:
        raise _Unreadable(f"decoding is not repeatable ({n} frames, then {n2})")
    return frames


class VideoListDataset(Dataset):
    """Clips from the videos of a list file; see the module docstring.

    ``__getitem__((index, seed))`` -> ``{"video": float32 (3, num_frames, size, size),
    "label": int, "index": int}`` or ``None``. With ``train=True`` the frames are a random
    TSN draw and go through ``train_transform`` (multi-scale crop, flip when ``flip``); all
    randomness comes from ``numpy.random.default_rng(seed)``. With ``train=False`` the
    segment middles go through ``eval_transform`` and the seed is unused. A plain int key
    means seed 0.
    """

    def __init__(
        self,
        list_file: str,
        root: str = "",
        num_frames: int = 16,
        size: int = 224,
        scales: Sequence[float] = DEFAULT_SCALES,
        flip: bool = True,
        train: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        if num_frames <= 0 or size <= 0:
            raise ValueError(f"VideoListDataset: bad num_frames={num_frames} / size={size}")
        self.list_file = list_file
        self.samples = read_video_list(list_file, root)
        if not self.samples:
            raise ValueError(f"VideoListDataset: {list_file} names no videos")
        self.num_frames, self.size = int(num_frames), int(size)
        self.scales, self.flip, self.train = tuple(float(s) for s in scales), bool(flip), bool(train)
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        if isinstance(key, (tuple, list)):
            if len(key) != 2:
                raise TypeError(f"dataset key must be (index, seed), got {key!r}")
            index, seed = int(key[0]), int(key[1])
        else:
            index, seed = int(key), 0
        if not 0 <= index < len(self.samples):
            raise IndexError(f"VideoListDataset: index {index} out of range [0, {len(self.samples)})")
        path, label = self.samples[index]
        rng = np.random.default_rng(seed) if self.train else None  # a bad seed is a caller bug: raise
        try:
            frames = load_clip(path, self.num_frames, rng, seed)
            if self.train:
                video = train_transform(frames, self.size, rng, scales=self.scales, flip=self.flip,
                                        mean=self.mean, std=self.std)
            else:
                video = eval_transform(frames, self.size, mean=self.mean, std=self.std)
        except Exception as e:  # noqa: BLE001 - any failure of one sample is reported, not raised
            reason = str(e) if isinstance(e, _Unreadable) else f"{type(e).__name__}: {e}"
            logger.warning("cannot read video %s: %s", path, reason)
            return None
        return {"video": video, "label": label, "index": index}
