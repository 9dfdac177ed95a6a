"""Training clips decoded and augmented by NVIDIA DALI (GPU decoder, or DALI's CPU decoder).

``DaliVideoLoader`` stands in for the PyAV ``DataLoader``: it iterates a
``ShardedBatchSampler`` (rank sharding, epoch-seeded shuffling and the resume position all
come from there) and yields the batches ``collate_skip_bad`` yields::

    {"video": (B, C, T, size, size) in ``dtype`` on cuda:device_id ("gpu") or the CPU ("cpu"),
     "label": int64 (B,), "index": int64 (B,), "num_bad": int}

with ``video`` None when no sample of the batch could be read.

Per sample, Python (on ``num_threads`` threads) reads the file's bytes, probes its frame
count, frame size, length and codec with PyAV (the stream header; what the header lacks
comes from the video packets, read without decoding: their number, and the span of their
timestamps; probes are cached per video), and draws the clip plan
(``clip_plan.plan_train_clip``: the same frames, crop and flip as the PyAV path for the
same (index, seed)). DALI then decodes just those frames (``fn.decoders.video``, device "mixed"
for "gpu", "cpu" for "cpu"), crops and resizes them in one bilinear step (``fn.resize``
with a pixel ROI, no antialias), mirrors and normalises them (``fn.crop_mirror_normalize``,
layout CFHW). The result is copied device-to-device into a torch tensor; nothing makes a
host round trip on the GPU path.

An entry's ``start_s`` / ``end_s`` segment maps to frames as in the PyAV path
(``lists.segment_frames``, with the list's ``total_s`` or the probed length); a clip with
fewer than ``min_frames`` frames to sample from is a bad sample, as there.

DALI's CPU decoder only handles VP8, VP9 and MJPEG (not H.264/HEVC); the GPU decoder adds
H.264, HEVC, AV1 and MPEG-4.

Bad input never stops the run and is never retried in a loop: a sample whose file is
missing, empty, not a video, has no frames or a codec the decoder cannot take is dropped
before DALI, with a warning on the ``"ivfast.data"`` logger naming the file, and counted in
``num_bad``. When DALI fails on a batch (a truncated file that passed the probe, say) the
pipeline is rebuilt and the batch's samples are decoded one at a time, once each: those
that fail again are warned about and counted, the rest are returned. (One difference from
the PyAV path: a file whose header claims more frames than it holds is a bad sample here,
where PyAV draws again from the frames that do decode.)

Batches are prepared ``prefetch`` ahead on a background thread (0: in the caller's thread),
so decoding overlaps training. Each ``iter(loader)`` starts an epoch at the sampler's
position and stops the previous epoch's thread; an epoch abandoned midway stops its thread
when it is closed, garbage collected, or at interpreter exit.
"""
from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ivfast.data.clip_plan import ClipPlan, plan_train_clip
from ivfast.data.lists import VideoEntry, segment_frames
from ivfast.data.transforms import DEFAULT_SCALES, IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger("ivfast.data")

# Codec names as FFmpeg (and so PyAV) reports them.
CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
GPU_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "mjpeg", "av1", "mpeg4"})

__all__ = ["DaliVideoLoader", "VideoProbe", "probe_video", "CPU_CODECS", "GPU_CODECS"]


class _Unreadable(Exception):
    """A sample that cannot give a clip; the message is the reason logged."""


@dataclass(frozen=True)
class VideoProbe:
    """What the clip plan needs to know about a video, read from its container."""

    num_frames: int
    height: int
    width: int
    duration_s: float | None  # the stream's length (header, else the packet timestamps' span)
    codec: str


def probe_video(data: bytes) -> VideoProbe:
    """Probe an encoded video held in memory. Raises ``_Unreadable`` (or a PyAV error)."""
    import io

    import av

    if not data:
        raise _Unreadable("empty file")
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise _Unreadable("no video stream")
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        height, width = int(stream.codec_context.height), int(stream.codec_context.width)
        total = int(stream.frames or 0)
        tb = stream.time_base
        duration = float(stream.duration * tb) if stream.duration and tb else None
        if total <= 0 or duration is None:  # e.g. Matroska / WebM: read the packets, decode nothing
            n, first, last = 0, None, None
            for packet in container.demux(stream):
                if packet.size <= 0:
                    continue
                n += 1
                if packet.pts is not None and tb:
                    t = float(packet.pts * tb)
                    first = t if first is None else min(first, t)
                    last = t if last is None else max(last, t)
            total = total if total > 0 else n
            if duration is None and first is not None and n >= 2 and last > first:
                duration = (last - first) * n / (n - 1)  # the span plus one mean frame interval
    if total <= 0:
        raise _Unreadable("zero frames")
    if height <= 0 or width <= 0:
        raise _Unreadable(f"bad frame size {width}x{height}")
    return VideoProbe(num_frames=total, height=height, width=width, duration_s=duration, codec=codec)


def _dali_reason(e: BaseException) -> str:
    """A one-line reason from a DALI exception: the text after its "encountered:" line,
    without the C++ context and the pipeline traceback around it."""
    text = str(e)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    text = text.split("C++ context:", 1)[0]
    text = " ".join(ln.strip() for ln in text.splitlines() if ln.strip())[:300]
    return f"DALI decoding failed: {text}" if text else f"DALI decoding failed ({type(e).__name__})"


@dataclass
class _Sample:
    index: int
    label: int
    path: str
    data: np.ndarray  # the encoded file, uint8
    plan: ClipPlan


class DaliVideoLoader:
    """Batches of DALI-decoded training clips; see the module docstring.

    ``entries``: the dataset's videos (``sampler`` indexes into them). ``num_frames``,
    ``size``, ``scales``: the TSN clip and MultiScaleCrop settings; each entry's ``flip``
    allows or forbids mirroring. ``mean`` / ``std``: per channel, in 0-1 units.
    ``device``: "gpu" (NVDEC decoding on cuda:``device_id``) or "cpu" (DALI's CPU decoder:
    VP8 / VP9 / MJPEG only). ``dtype``: the output dtype (float32, float16 or bfloat16).
    ``num_threads``: DALI's worker threads. ``prefetch``: batches prepared ahead.
    ``min_frames``: fewer frames (in the segment) make a bad sample (``data.min_frames``).
    """

    def __init__(
        self,
        entries: Sequence[VideoEntry],
        sampler,
        *,
        num_frames: int,
        size: int,
        scales: Sequence[float] = DEFAULT_SCALES,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        device: str = "gpu",
        device_id: int = 0,
        dtype: torch.dtype = torch.float32,
        num_threads: int = 4,
        prefetch: int = 2,
        min_frames: int = 1,
    ):
        if device not in ("gpu", "cpu"):
            raise ValueError(f"DaliVideoLoader: device must be 'gpu' or 'cpu', got {device!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"DaliVideoLoader: dtype must be float32, float16 or bfloat16, got {dtype}")
        if num_frames <= 0 or size <= 0 or num_threads <= 0 or prefetch < 0:
            raise ValueError(f"DaliVideoLoader: bad num_frames={num_frames} / size={size} / "
                             f"num_threads={num_threads} / prefetch={prefetch}")
        if min_frames < 1:
            raise ValueError(f"DaliVideoLoader: min_frames must be >= 1, got {min_frames}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"DaliVideoLoader: mean/std need 3 entries, got {len(mean)}/{len(std)}")
        if not entries:
            raise ValueError("DaliVideoLoader: no videos")
        if getattr(sampler, "num_samples", len(entries)) != len(entries):
            raise ValueError(f"DaliVideoLoader: the sampler covers {sampler.num_samples} samples, "
                             f"the list has {len(entries)}")
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("DaliVideoLoader: device='gpu' needs CUDA (use device='cpu' for DALI's CPU decoder)")
        import nvidia.dali  # noqa: F401  - fail here, not on the loader thread, when DALI is missing

        self.entries = list(entries)
        self.sampler = sampler
        self.num_frames, self.size = int(num_frames), int(size)
        self.scales = tuple(float(s) for s in scales)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.device, self.device_id, self.dtype = device, int(device_id), dtype
        self.num_threads, self.prefetch, self.min_frames = int(num_threads), int(prefetch), int(min_frames)
        self.max_batch = int(sampler.batch_size)
        self.codecs = GPU_CODECS if device == "gpu" else CPU_CODECS
        self._pipe = None
        self._pool = None  # threads that read and probe the files of a batch
        self._stream = None  # the CUDA stream the loader thread copies DALI's output on
        self._probes: dict[int, VideoProbe] = {}
        self._epoch = None  # a weak reference: an abandoned epoch is collected and stops its thread

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        self._stop_epoch()
        epoch = _Epoch(self, iter(self.sampler))
        self._epoch = weakref.ref(epoch)
        return epoch

    def _stop_epoch(self) -> None:
        epoch = self._epoch() if self._epoch is not None else None
        if epoch is not None:
            epoch.close()
        self._epoch = None

    def close(self) -> None:
        """Stop the running epoch, free the DALI pipeline and the file-reading threads."""
        self._stop_epoch()
        self._pipe = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ---- one batch --------------------------------------------------------------------

    def load_batch(self, keys) -> dict:
        """The batch for sampler keys ``[(index, sample_seed), ...]`` (see the module docstring)."""
        keys = [(int(i), int(s)) for i, s in keys]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="ivfast-dali-read")
        # File reads and PyAV probes release the GIL: a thread pool overlaps them.
        prepared = list(self._pool.map(self._try_prepare, keys))
        samples, num_bad = [], 0
        for (index, _), (sample, reason) in zip(keys, prepared):
            if sample is None:
                logger.warning("cannot read video %s: %s", self.entries[index].path, reason)
                num_bad += 1
            else:
                samples.append(sample)
        video = None
        if samples:
            try:
                video = self._decode(samples)
            except Exception as e:  # noqa: BLE001 - find the bad sample(s), keep the rest
                logger.info("DALI failed on a batch of %d (%s); decoding its samples one at a time",
                            len(samples), _dali_reason(e))
                self._pipe = None  # rebuilt: its state after an error is not relied upon
                good, parts = [], []
                for s in samples:
                    try:
                        parts.append(self._decode([s]))
                        good.append(s)
                    except Exception as e1:  # noqa: BLE001
                        logger.warning("cannot read video %s: %s", s.path, _dali_reason(e1))
                        num_bad += 1
                        self._pipe = None
                samples = good
                video = torch.cat(parts) if parts else None
        return {
            "video": video,
            "label": torch.tensor([s.label for s in samples], dtype=torch.int64),
            "index": torch.tensor([s.index for s in samples], dtype=torch.int64),
            "num_bad": num_bad,
        }

    def _try_prepare(self, key: tuple[int, int]) -> tuple[_Sample | None, str]:
        index, seed = key
        try:
            return self._prepare(index, seed, self.entries[index]), ""
        except Exception as e:  # noqa: BLE001 - one bad sample is reported, never raised
            return None, str(e) if isinstance(e, _Unreadable) else f"{type(e).__name__}: {e}"

    def _prepare(self, index: int, seed: int, entry: VideoEntry) -> _Sample:
        try:
            data = np.fromfile(entry.path, dtype=np.uint8)
        except FileNotFoundError:
            raise _Unreadable("file not found") from None
        if data.size == 0:
            raise _Unreadable("empty file")
        probe = self._probes.get(index)
        if probe is None:
            probe = probe_video(data.tobytes())
            if probe.codec not in self.codecs:
                which = "DALI's CPU decoder (VP8, VP9, MJPEG only)" if self.device == "cpu" else "DALI's GPU decoder"
                raise _Unreadable(f"codec {probe.codec} is not supported by {which}")
            self._probes[index] = probe
        first, count = segment_frames(entry, probe.num_frames, probe.duration_s)
        if count < self.min_frames:
            raise _Unreadable(f"too short: {count} frames, fewer than data.min_frames = {self.min_frames}")
        plan = plan_train_clip(count, probe.height, probe.width, self.num_frames, self.size, self.scales,
                               entry.flip, np.random.default_rng(seed), first_frame=first)
        return _Sample(index=index, label=int(entry.label), path=entry.path, data=data, plan=plan)

    def _build(self):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        half = self.dtype in (torch.float16, torch.bfloat16)
        pipe = Pipeline(batch_size=self.max_batch, num_threads=self.num_threads,
                        device_id=self.device_id if self.device == "gpu" else None,
                        prefetch_queue_depth=1, exec_dynamic=True)
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            video = fn.decoders.video(encoded, device="mixed" if self.device == "gpu" else "cpu",
                                      frames=frames, pad_mode="none")  # (F, H, W, C) uint8
            video = fn.resize(video, roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                              size=[self.size, self.size], interp_type=types.INTERP_LINEAR, antialias=False)
            video = fn.crop_mirror_normalize(
                video, mirror=mirror, mean=[255.0 * m for m in self.mean], std=[255.0 * s for s in self.std],
                dtype=types.FLOAT16 if half else types.FLOAT, output_layout="CFHW")
            pipe.set_outputs(video)
        pipe.build()
        return pipe

    def _decode(self, samples: list[_Sample]) -> torch.Tensor:
        """Run DALI on ``samples``; (len(samples), C, T, size, size) in ``self.dtype``."""
        if self._pipe is None:
            self._pipe = self._build()
        pipe = self._pipe
        plans = [s.plan for s in samples]
        pipe.feed_input("encoded", [s.data for s in samples])
        pipe.feed_input("frames", [p.indices.astype(np.int32) for p in plans])
        pipe.feed_input("roi_start", [np.array([p.y0, p.x0], dtype=np.float32) for p in plans])
        pipe.feed_input("roi_end", [np.array([p.y0 + p.crop_h, p.x0 + p.crop_w], dtype=np.float32) for p in plans])
        pipe.feed_input("mirror", [np.array(int(p.flip), dtype=np.int32) for p in plans])
        (out,) = pipe.run()
        out = out.as_tensor()  # (B, C, T, size, size)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        shape = tuple(out.shape())
        dali_dtype = torch.float16 if self.dtype in (torch.float16, torch.bfloat16) else torch.float32
        if self.device == "cpu":
            buf = torch.empty(shape, dtype=dali_dtype)
            feed_ndarray(out, buf)
            return buf.to(self.dtype)
        with torch.cuda.device(self.device_id):
            if self._stream is None:
                self._stream = torch.cuda.Stream()
            with torch.cuda.stream(self._stream):
                buf = torch.empty(shape, dtype=dali_dtype, device=f"cuda:{self.device_id}")
                feed_ndarray(out, buf, cuda_stream=self._stream)
                video = buf.to(self.dtype)
            self._stream.synchronize()  # the loader thread waits, not the training thread
        return video


_live_epochs: "weakref.WeakSet[_Epoch]" = weakref.WeakSet()


@atexit.register
def _stop_all_epochs() -> None:
    for epoch in list(_live_epochs):
        epoch.close()


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _work(loader: DaliVideoLoader, keys_iter, q: queue.Queue, stop: threading.Event) -> None:
    """The loader thread. It holds no reference to its ``_Epoch``, so an abandoned epoch is
    garbage collected, and its finaliser stops the thread."""
    try:
        for keys in keys_iter:
            if stop.is_set():
                return
            if not _put(q, stop, loader.load_batch(keys)):
                return
        _put(q, stop, _END)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
        _put(q, stop, e)


_END = object()


class _Epoch:
    """One pass over the sampler's batches, prepared ``prefetch`` ahead on a thread."""

    def __init__(self, loader: DaliVideoLoader, keys_iter):
        self._loader = loader
        self._keys = keys_iter
        self._closed = False
        self._thread = None
        if loader.prefetch > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=loader.prefetch)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=_work, args=(loader, keys_iter, self._queue, self._stop),
                                            name="ivfast-dali-loader", daemon=True)
            _live_epochs.add(self)
            self._thread.start()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._closed:
            raise StopIteration
        if self._thread is None:
            keys = next(self._keys, None)
            if keys is None:
                self._closed = True
                raise StopIteration
            return self._loader.load_batch(keys)
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self.close()
                    raise RuntimeError("the DALI loader thread ended without finishing the epoch") from None
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        video = item["video"]
        if video is not None and video.is_cuda:  # made on the loader's stream, used on the current one
            video.record_stream(torch.cuda.current_stream(video.device))
        return item

    def close(self) -> None:
        """Stop the loader thread (it finishes the batch it is decoding) and drop queued batches."""
        self._closed = True
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        while True:  # unblock a put in progress
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if thread is not threading.current_thread():
            thread.join()
        _live_epochs.discard(self)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass
