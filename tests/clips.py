"""Small test videos written with PyAV (good ones, and broken ones for the error paths)."""
from __future__ import annotations

import os

import numpy as np
import torch

from ivfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# Gray level of frame k in a numbered clip: far enough apart to survive lossy coding.
LEVEL_STEP = 20
LEVEL_BASE = 10


def frame_level(k: int) -> int:
    return LEVEL_BASE + LEVEL_STEP * k


def level_to_frame(level: float) -> int:
    return int(round((level - LEVEL_BASE) / LEVEL_STEP))


# The loaders' normalisation, shaped to broadcast over a (C, T, H, W) clip.
MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1, 1)
STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1, 1)


def to_255(video: torch.Tensor) -> torch.Tensor:
    """A normalised (C, T, H, W) clip back in 0..255 units (float32, on the CPU)."""
    return (video.float().cpu() * STD + MEAN) * 255


def frame_levels(video: torch.Tensor) -> np.ndarray:
    """Per-frame mean gray level (0..255) of a normalised (C, T, H, W) clip."""
    return to_255(video).mean(dim=(0, 2, 3)).numpy()


def frames_of(video: torch.Tensor) -> list[int]:
    """Frame numbers of a normalised (C, T, H, W) clip of a numbered video."""
    return [level_to_frame(x) for x in frame_levels(video)]


def write_video(path: str, frames: np.ndarray, codec: str | None = None, fps: int = 25) -> str:
    """Encode uint8 RGB frames (T, H, W, 3) (H, W even) to ``path``.

    The codec follows the extension unless given: .mp4 / .mkv -> libx264 (near-lossless),
    .avi -> mjpeg, .webm -> libvpx-vp9. H.264 needs even H, W; VP9 and MJPEG take odd sizes.
    """
    import av

    ext = os.path.splitext(path)[1].lower()
    codec = codec or {".avi": "mjpeg", ".webm": "libvpx-vp9"}.get(ext, "libx264")
    t, h, w, _ = frames.shape
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.codec_context.thread_count = 1  # no encoder threads left behind when tests fork
        if codec == "libx264":
            stream.options = {"crf": "0", "preset": "ultrafast"}
        for k in range(t):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[k]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def numbered_frames(num_frames: int = 12, width: int = 64, height: int = 48) -> np.ndarray:
    """Uniform gray frames whose level encodes the frame number (see ``frame_level``)."""
    levels = np.array([frame_level(k) for k in range(num_frames)], dtype=np.uint8)
    if levels.max() > 245:
        raise ValueError("too many frames for the gray-level code")
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()


def write_numbered_clip(path: str, num_frames: int = 12, width: int = 64, height: int = 48) -> str:
    return write_video(path, numbered_frames(num_frames, width, height))


def write_corrupt(path: str, nbytes: int = 4096, seed: int = 0) -> str:
    with open(path, "wb") as f:
        f.write(np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    return path


def write_truncated(src: str, path: str, fraction: float = 0.3) -> str:
    with open(src, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * fraction)])
    return path


def write_empty(path: str) -> str:
    open(path, "wb").close()
    return path


def write_timed_clip(path: str, times_ms, width: int = 64, height: int = 48) -> str:
    """A numbered H.264 clip whose frame k is shown at ``times_ms[k]`` milliseconds: uneven
    gaps make a variable-frame-rate file, a first time > 0 a stream that does not start at 0."""
    from fractions import Fraction

    import av

    frames = numbered_frames(len(times_ms), width, height)
    tb = Fraction(1, 1000)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = stream.codec_context.time_base = tb
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "0", "preset": "ultrafast"}
        for k, t in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(frames[k], format="rgb24")
            frame.pts, frame.time_base = int(t), tb
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_garbled(src: str, path: str, keep: int = 1024, seed: int = 0) -> str:
    """``src``'s first ``keep`` bytes (a valid header), then random bytes to the same length."""
    with open(src, "rb") as f:
        data = f.read()
    junk = np.random.default_rng(seed).integers(0, 256, max(0, len(data) - keep), dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(data[:keep] + junk)
    return path
