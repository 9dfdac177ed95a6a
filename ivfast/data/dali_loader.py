"""Training clips decoded and augmented by NVIDIA DALI (NVDEC on the GPU, or DALI's CPU decoder),
with the PyAV path's frames, crop and flip for the same (index, sample seed)."""
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
from ivfast.data.video_list import UnreadableVideo, failure_reason

logger = logging.getLogger("ivfast.data")

# The codecs each DALI decoder takes, named as FFmpeg (and so PyAV) names them.
CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
GPU_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "mjpeg", "av1", "mpeg4"})

__all__ = ["DaliVideoLoader", "VideoProbe", "probe_video", "CPU_CODECS", "GPU_CODECS"]


@dataclass(frozen=True)
class VideoProbe:
    """What the clip plan needs to know about a video, read from its container."""

    num_frames: int
    height: int
    width: int
    duration_s: float | None  # the stream's length (header, else the packet timestamps' span)
    codec: str


def probe_video(data: bytes) -> VideoProbe:
    """Probe an encoded video held in memory. Raises ``UnreadableVideo`` (or a PyAV error).

    What the header lacks (Matroska / WebM state no frame count) comes from the packets,
    read without decoding: their number, and the span of their timestamps.
    """
    import io

    import av

    if not data:
        raise UnreadableVideo("empty file")
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise UnreadableVideo("no video stream")
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
        raise UnreadableVideo("zero frames")
    if height <= 0 or width <= 0:
        raise UnreadableVideo(f"bad frame size {width}x{height}")
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
    """Batches of DALI-decoded training clips in place of the PyAV ``DataLoader``.

    It iterates ``sampler`` (a ``ShardedBatchSampler``: sharding, epoch order and resume
    position come from there) and yields what ``collate_skip_bad`` yields, ``video``
    ``(B, C, T, size, size)`` in ``dtype`` on cuda:``device_id`` ("gpu") or the CPU ("cpu"),
    None when no sample of the batch could be read.

    Per sample, Python threads read the file, probe it (``probe_video``, cached per index)
    and draw ``clip_plan.plan_train_clip`` from ``default_rng(sample_seed)``: the PyAV path's
    frames, crop and flip, and its segment and ``min_frames`` rules. DALI then decodes just
    those frames, crops and resizes them in one bilinear step (pixel ROI, no antialias),
    mirrors, normalises (layout CFHW) and the result is copied device to device.

    Bad input never stops the run and is never retried in a loop: a sample the probe
    rejects (missing, empty, not a video, no frames, a codec the decoder cannot take) is
    dropped before DALI, warned about on the ``"ivfast.data"`` logger and counted in
    ``num_bad``. When DALI fails on a batch the pipeline is rebuilt and the batch's samples
    are decoded one at a time, once each; those that fail again are warned about and
    counted. Unlike the PyAV path, a header that claims more frames than decode makes a
    bad sample here.

    ``entries``: the dataset's videos (``sampler`` indexes into them); each entry's ``flip``
    allows or forbids mirroring. ``mean`` / ``std``: per channel, in 0-1 units. ``device``:
    "gpu" or "cpu" (VP8 / VP9 / MJPEG only). ``dtype``: float32, float16 or bfloat16.
    ``num_threads``: DALI's and the file readers' threads. ``prefetch``: batches prepared
    ahead on a background thread (0: in the caller's thread). ``min_frames``: fewer frames
    (in the segment) make a bad sample. Each ``iter(loader)`` starts an epoch at the
    sampler's position and stops the previous epoch's thread; an abandoned epoch stops its
    thread when closed, garbage collected, or at interpreter exit.
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
        """The batch for sampler keys ``[(index, sample_seed), ...]`` (see the class docstring)."""
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
            return None, failure_reason(e)

    def _prepare(self, index: int, seed: int, entry: VideoEntry) -> _Sample:
        if entry.error:  # a malformed list line, kept as a bad sample
            raise UnreadableVideo(entry.error)
        try:
            data = np.fromfile(entry.path, dtype=np.uint8)
        except FileNotFoundError:
            raise UnreadableVideo("file not found") from None
        if data.size == 0:
            raise UnreadableVideo("empty file")
        probe = self._probes.get(index)
        if probe is None:
            probe = probe_video(data.tobytes())
            if probe.codec not in self.codecs:
                which = "DALI's CPU decoder (VP8, VP9, MJPEG only)" if self.device == "cpu" else "DALI's GPU decoder"
                raise UnreadableVideo(f"codec {probe.codec} is not supported by {which}")
            self._probes[index] = probe
        first, count = segment_frames(entry, probe.num_frames, probe.duration_s)
        if count < self.min_frames:
            raise UnreadableVideo(f"too short: {count} frames, fewer than data.min_frames = {self.min_frames}")
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
