"""Clips from the videos of a dataset list, decoded with PyAV in the calling process."""
from __future__ import annotations

import io
import logging
import os
from typing import Sequence

import numpy as np
from torch.utils.data import Dataset

from ivfast.data import fs
from ivfast.data.collate import sample_key
from ivfast.data.decode_timeout import Deadline, time_limit
from ivfast.data.frames import FRAME_TEMPLATE, check_template, load_frames
from ivfast.data.lists import UnreadableVideo, VideoEntry, read_list, segment_frames
from ivfast.data.sampling import clip_indices
from ivfast.data.transforms import DEFAULT_SCALES, IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

logger = logging.getLogger("ivfast.data")


def failure_reason(e: BaseException) -> str:
    """The one-line reason logged for a sample that failed with ``e``."""
    return str(e) if isinstance(e, UnreadableVideo) else f"{type(e).__name__}: {e}"


def _in_memory(path: str | bytes) -> str | bytes:
    """A URL's whole file, read once (``fs.read_bytes``) to be decoded from memory; a local path
    or bytes as they are."""
    if not (isinstance(path, str) and fs.is_url(path)):
        return path
    try:
        data = fs.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError):
        raise UnreadableVideo("file not found") from None
    if not data:
        raise UnreadableVideo("empty file")
    return data


def open_video(path: str | bytes, timeout_s: float = 0.0):
    """An open PyAV container with a video stream; ``timeout_s > 0`` bounds each blocking read.

    ``path``: a file, a URL (``fs.is_url``: read whole through fsspec and decoded from memory) or
    the encoded video itself (``bytes``, e.g. a tar shard's member)."""
    import av  # imported lazily: the synthetic data path needs no PyAV

    path = _in_memory(path)
    if isinstance(path, bytes):
        if not path:
            raise UnreadableVideo("empty member")
        source = io.BytesIO(path)
    else:
        if not os.path.exists(path):
            raise UnreadableVideo("file not found")
        if os.path.getsize(path) == 0:
            raise UnreadableVideo("empty file")
        source = path
    container = av.open(source, timeout=timeout_s if timeout_s > 0 else None)
    if not container.streams.video:
        container.close()
        raise UnreadableVideo("no video stream")
    # Single-threaded decoding: the parallelism comes from DataLoader workers, and a codec
    # context with FFmpeg slice/frame threads that is still alive (e.g. in an uncollected
    # reference cycle) when a worker is forked deadlocks the worker when it frees it.
    stream = container.streams.video[0]
    stream.codec_context.thread_count = 1
    stream.thread_type = "NONE"
    return container


def _stream_duration_s(container) -> float | None:
    """The video stream's length in seconds as its header states it, or None."""
    stream = container.streams.video[0]
    duration, time_base = getattr(stream, "duration", None), getattr(stream, "time_base", None)
    return float(duration * time_base) if duration and time_base else None


def _count_frames(path: str | bytes, deadline: Deadline | None = None) -> tuple[int, float | None]:
    """Decode the whole video stream: ``(frames, length in seconds)``.

    The length is the span of the frame timestamps plus one mean frame interval (so it
    does not include a non-zero start time), or None when there are fewer than 2 timed frames.
    """
    n, first, last = 0, None, None
    with open_video(path, deadline.seconds if deadline else 0.0) as container:
        for frame in container.decode(container.streams.video[0]):
            n += 1
            t = frame.time
            if t is not None:
                first = t if first is None else min(first, t)
                last = t if last is None else max(last, t)
            if deadline is not None:
                deadline.check()
    span = None if first is None or last is None or n < 2 or last <= first else (last - first) * n / (n - 1)
    return n, span


def _decode_at(path: str | bytes, indices: np.ndarray,
               deadline: Deadline | None = None) -> tuple[np.ndarray | None, int]:
    """Decode frames ``0 .. max(indices)`` in order, keep those at ``indices`` as RGB uint8.

    Returns ``((T, H, W, 3) uint8, n)`` when every index was reached, else ``(None, n)``
    with ``n`` the number of frames the stream actually held.
    """
    last = int(indices[-1])
    wanted = set(int(i) for i in indices)
    got: dict[int, np.ndarray] = {}
    n = 0
    with open_video(path, deadline.seconds if deadline else 0.0) as container:
        for frame in container.decode(container.streams.video[0]):
            if n in wanted:
                got[n] = frame.to_ndarray(format="rgb24")
            n += 1
            if deadline is not None:
                deadline.check()
            if n > last:
                break
    if n <= last:
        return None, n
    return np.stack([got[int(i)] for i in indices]), n


def _needs_length(entry: VideoEntry | None) -> bool:
    """Whether mapping ``entry``'s segment to frames needs the video's length from the file."""
    return entry is not None and entry.total_s is None and (entry.start_s is not None or entry.end_s is not None)


def _clip_indices(entry: VideoEntry | None, total: int, duration: float | None, num_frames: int,
                  rng: np.random.Generator | None, min_frames: int) -> np.ndarray:
    first, count = (0, total) if entry is None else segment_frames(entry, total, duration)
    return first + clip_indices(count, num_frames, rng, min_frames)


def load_clip(path: str | bytes, num_frames: int, rng: np.random.Generator | None, seed: int | None = None, *,
              entry: VideoEntry | None = None, min_frames: int = 1, timeout_s: float = 0.0) -> np.ndarray:
    """TSN-sampled RGB uint8 frames ``(num_frames, H, W, 3)`` of one video (``path``: as
    :func:`open_video` takes it, a file, a URL or the encoded bytes).

    Frames are numbered in decode order (timestamps pick nothing), so a stream that starts
    after time 0 or has a variable frame rate is sampled like any other. The frame count
    comes from the stream header, else from a decoding pass. ``entry`` (optional) supplies
    a ``start_s`` / ``end_s`` segment (``lists.segment_frames``). If the header overstates
    the count, the indices are drawn again on the true count (from a fresh
    ``default_rng(seed)`` when training) and decoded once more: at most two passes.
    ``timeout_s > 0`` bounds the whole call (``decode_timeout.time_limit``). Raises
    ``UnreadableVideo``, ``DecodeTimeout``, ``ValueError`` (an empty segment) or a PyAV / OS
    error.
    """
    with time_limit(timeout_s) as deadline:
        where = "an in-memory video" if isinstance(path, bytes) else path
        path = _in_memory(path)  # a URL is read once; every pass below decodes the same bytes
        with open_video(path, timeout_s) as container:
            total = int(container.streams.video[0].frames or 0)
            duration = _stream_duration_s(container) if _needs_length(entry) else None
        counted = total <= 0
        if counted or (_needs_length(entry) and duration is None):
            n_counted, span = _count_frames(path, deadline)
            total = n_counted if counted else total
            duration = duration if duration is not None else span
        if total <= 0:
            raise UnreadableVideo("zero frames")
        indices = _clip_indices(entry, total, duration, num_frames, rng, min_frames)
        frames, n = _decode_at(path, indices, deadline)
        if frames is not None:
            return frames
        if n <= 0:
            raise UnreadableVideo("zero decodable frames")
        if counted:  # the count came from decoding; a shorter second decode is not a clean video
            raise UnreadableVideo(f"decoding is not repeatable ({total} frames counted, then {n})")
        logger.info("%s: the header says %d frames but only %d decode; sampling from %d", where, total, n, n)
        if rng is not None:
            rng = np.random.default_rng(seed)
        indices = _clip_indices(entry, n, duration, num_frames, rng, min_frames)
        frames, n2 = _decode_at(path, indices, deadline)
        if frames is None:
            raise UnreadableVideo(f"decoding is not repeatable ({n} frames, then {n2})")
        return frames


def read_entry(entry: VideoEntry, num_frames: int, rng: np.random.Generator | None, seed: int | None = None, *,
               template: str = FRAME_TEMPLATE, min_frames: int = 1, timeout_s: float = 0.0) -> np.ndarray:
    """The TSN-sampled frames ``(num_frames, H, W, 3)`` uint8 of one list entry, whatever it
    names: a malformed line raises its ``error`` as :class:`UnreadableVideo`, a folder of
    frames is read by :func:`~ivfast.data.frames.load_frames` (``template``), a video file
    (path or URL) is decoded by :func:`load_clip`. Raises what those raise."""
    if entry.error:
        raise UnreadableVideo(entry.error)
    if entry.frames:
        return load_frames(entry, num_frames, rng, template=template, min_frames=min_frames, timeout_s=timeout_s)
    return load_clip(entry.path, num_frames, rng, seed, entry=entry, min_frames=min_frames, timeout_s=timeout_s)


class VideoListDataset(Dataset):
    """Clips from the videos of a dataset list, keyed ``(index, sample_seed)``.

    ``videos``: a list file (any format of :mod:`ivfast.data.lists`; relative paths join
    ``root``; malformed lines are kept as bad samples, see below) or a sequence of
    ``VideoEntry`` (paths used as they are). Paths may be fsspec URLs (:mod:`ivfast.data.fs`).
    An entry with ``frames`` is a folder of frames named by ``frame_template``
    (:func:`ivfast.data.frames.load_frames`): the same frame indices, transforms and draws
    as a video of that many frames.
    ``__getitem__((index, seed))`` -> ``{"video": float32 (3, num_frames, size, size),
    "label": int, "index": int}`` or ``None``. With ``train=True`` the frames are a random
    TSN draw through ``train_transform`` (flip only when both ``flip`` and the entry's
    ``flip`` allow it), every draw from ``numpy.random.default_rng(seed)``; with
    ``train=False`` the segment middles go through ``eval_transform`` and the seed is
    unused. A plain int key means seed 0.

    The video is opened inside the call and nothing decoded is kept, so each DataLoader
    worker has its own decoder. A sample that cannot be read (missing, empty, not a video,
    no frames, fewer than ``min_frames`` frames, a decoding error, decoding longer than
    ``decode_timeout_s``, a missing or undecodable frame of a folder, a malformed list
    line: its ``error`` names the list file and line) logs one warning on the
    ``"ivfast.data"`` logger naming the file and the reason and returns ``None``: never
    retried, never replaced by another index.
    An ``index`` out of range is a caller bug and raises ``IndexError``.
    """

    def __init__(
        self,
        videos: str | Sequence[VideoEntry],
        root: str = "",
        num_frames: int = 16,
        size: int = 224,
        scales: Sequence[float] = DEFAULT_SCALES,
        flip: bool = True,
        train: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        list_format: str = "auto",
        decode_timeout_s: float = 0.0,
        min_frames: int = 1,
        frame_template: str = FRAME_TEMPLATE,
    ):
        if num_frames <= 0 or size <= 0:
            raise ValueError(f"VideoListDataset: bad num_frames={num_frames} / size={size}")
        if min_frames < 1:
            raise ValueError(f"VideoListDataset: min_frames must be >= 1, got {min_frames}")
        if isinstance(videos, (str, os.PathLike)):
            self.list_file = str(videos)
            self.entries = read_list(self.list_file, root, list_format, bad_lines="keep")
        else:
            self.list_file = "<entries>"
            self.entries = list(videos)
        if not self.entries:
            raise ValueError(f"VideoListDataset: {self.list_file} names no videos")
        self.num_frames, self.size = int(num_frames), int(size)
        self.scales, self.flip, self.train = tuple(float(s) for s in scales), bool(flip), bool(train)
        self.mean, self.std = tuple(mean), tuple(std)
        self.decode_timeout_s, self.min_frames = float(decode_timeout_s), int(min_frames)
        self.frame_template = check_template(frame_template)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key):
        index, seed = sample_key(key)
        if not 0 <= index < len(self.entries):
            raise IndexError(f"VideoListDataset: index {index} out of range [0, {len(self.entries)})")
        entry = self.entries[index]
        rng = np.random.default_rng(seed) if self.train else None  # a bad seed is a caller bug: raise
        try:
            frames = read_entry(entry, self.num_frames, rng, seed, template=self.frame_template,
                                min_frames=self.min_frames, timeout_s=self.decode_timeout_s)
            if self.train:
                video = train_transform(frames, self.size, rng, scales=self.scales, flip=self.flip and entry.flip,
                                        mean=self.mean, std=self.std)
            else:
                video = eval_transform(frames, self.size, mean=self.mean, std=self.std)
        except Exception as e:  # noqa: BLE001 - any failure of one sample is reported, not raised
            logger.warning("cannot read video %s: %s", entry.path, failure_reason(e))
            return None
        return {"video": video, "label": entry.label, "index": index}
