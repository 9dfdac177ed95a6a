"""Clips from folders of extracted frames (one image file per frame), sampled like video clips."""
from __future__ import annotations

import io

import numpy as np

from ivfast.data import fs
from ivfast.data.config import FRAME_TEMPLATE, frame_name, frame_template_error
from ivfast.data.decode_timeout import Deadline, time_limit
from ivfast.data.lists import UnreadableVideo, VideoEntry
from ivfast.data.sampling import clip_indices


def check_template(template: str) -> str:
    """``template`` if it names frame files by their number (``img_{:05d}.jpg``; the
    printf style ``img_%05d.jpg`` also works), else ``ValueError``."""
    why = frame_template_error(template)
    if why is not None:
        raise ValueError(f"frame template {template!r} {why}")
    return template


def decode_image(data: bytes, name: str = "") -> np.ndarray:
    """An encoded image (JPEG, PNG, ...) as RGB uint8 ``(H, W, 3)``: with PIL when it is
    installed, else with PyAV's image decoders."""
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is not None:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    import av

    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(video=0):
            return frame.to_ndarray(format="rgb24")
    raise ValueError(f"no image in {name or 'the file'}")


def read_frame(path: str) -> np.ndarray:
    """One frame file as RGB uint8; a missing, empty or undecodable file raises
    ``UnreadableVideo`` naming it."""
    try:
        data = fs.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise UnreadableVideo(f"missing frame {path}") from None
    if not data:
        raise UnreadableVideo(f"empty frame file {path}")
    try:
        return decode_image(data, path)
    except Exception as e:  # noqa: BLE001 - any decoder failure names the frame
        raise UnreadableVideo(f"cannot decode frame {path}: {type(e).__name__}: {e}") from None


def load_frames(entry: VideoEntry, num_frames: int, rng: np.random.Generator | None, *,
                template: str = FRAME_TEMPLATE, min_frames: int = 1, timeout_s: float = 0.0) -> np.ndarray:
    """TSN-sampled RGB uint8 frames ``(num_frames, H, W, 3)`` of a folder of frames.

    The folder ``entry.path`` holds ``entry.frame_count`` frames, the k-th (from 0) in the
    file ``frame_name(template, entry.start_frame + k)``. The frame indices ``k`` are
    drawn exactly as for a video of that many frames (``tsn_indices``, one ``rng`` draw),
    so a folder of a video's frames gives the clip the video gives for the same seed. Only
    the chosen frames are read. Raises ``UnreadableVideo`` (too short, a missing, empty or
    undecodable frame, frames of different sizes) or ``DecodeTimeout``.
    """
    count = entry.frame_count
    if not count or count < 1:
        raise UnreadableVideo(f"a folder of frames needs its frame count (got {count})")
    indices = clip_indices(count, num_frames, rng, min_frames)
    with time_limit(timeout_s) as deadline:
        def read(k: int) -> np.ndarray:
            return read_frame(fs.join(entry.path, frame_name(template, entry.start_frame + k)))

        return stack_frames(indices, read, deadline)


def stack_frames(indices: np.ndarray, read, deadline: Deadline | None = None) -> np.ndarray:
    """``(len(indices), H, W, 3)``: frame ``k`` read once by ``read(k)`` (RGB uint8) per distinct
    index, in ascending order; ``UnreadableVideo`` when the frames differ in size."""
    got: dict[int, np.ndarray] = {}
    for k in sorted({int(i) for i in indices}):
        got[k] = read(k)
        if deadline is not None:
            deadline.check()
    shapes = {a.shape for a in got.values()}
    if len(shapes) > 1:
        raise UnreadableVideo(f"frames of different sizes {sorted(shapes)}")
    return np.stack([got[int(i)] for i in indices])
