"""The DALI video backend: clip plans shared with the PyAV path, DALI's CPU decoder against
PyAV, bad files, epochs on the loader thread; one GPU test (NVDEC H.264 -> bf16 on cuda)."""
from __future__ import annotations

import gc
import logging
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from ivfast.data.clip_plan import plan_train_clip  # noqa: E402
from ivfast.data.dali_loader import DaliVideoLoader, probe_video  # noqa: E402
from ivfast.data.lists import VideoEntry  # noqa: E402
from ivfast.data.loader import ShardedBatchSampler  # noqa: E402
from ivfast.data.sampling import tsn_indices  # noqa: E402
from ivfast.data.video_list import VideoListDataset  # noqa: E402
from tests.clips import (  # noqa: E402
    frames_of,
    numbered_frames,
    to_255,
    write_corrupt,
    write_empty,
    write_truncated,
    write_video,
)

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="DALI's mixed (NVDEC) decoder needs a CUDA GPU")


def _smooth_frames(num_frames: int = 16, width: int = 64, height: int = 48) -> np.ndarray:
    """Ramps in x (R), y (G) and both (B) that move with the frame number: every crop offset
    and a mirror change the picture, and nothing is sharp enough to make codecs ring."""
    yy, xx = np.mgrid[0:height, 0:width]
    xx, yy = xx * 64 // width, yy * 48 // height  # the same ramps at any size
    return np.stack([np.stack([xx * 3 + 5 * k, yy * 4 + 3 * k, (xx + yy) * 2], -1)
                     for k in range(num_frames)]).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("dali_clips")
    out = {
        "num_vp9": write_video(str(d / "num.webm"), numbered_frames(12), "libvpx-vp9"),
        "num_mjpeg": write_video(str(d / "num.avi"), numbered_frames(12)),
        "short_vp9": write_video(str(d / "short.webm"), numbered_frames(5), "libvpx-vp9"),
        "smooth_vp9": write_video(str(d / "smooth.webm"), _smooth_frames(), "libvpx-vp9"),
        "smooth_mjpeg": write_video(str(d / "smooth.avi"), _smooth_frames()),
        "h264": write_video(str(d / "num.mp4"), numbered_frames(12)),
        "empty": write_empty(str(d / "empty.webm")),
        "missing": str(d / "missing.webm"),
        "corrupt": write_corrupt(str(d / "corrupt.webm")),
    }
    # Truncated after the header: the probe still reads 16 frames, DALI's decoder fails.
    out["truncated_mjpeg"] = write_truncated(out["smooth_mjpeg"], str(d / "truncated.avi"), 0.8)
    return out


def _write_h264(path: str, frames: np.ndarray) -> str:
    """H.264 in MP4 that NVDEC takes: High profile 4:2:0 (not the lossless crf 0 that
    ``write_video`` makes, whose High 4:4:4 Predictive profile NVDEC does not decode)."""
    import av

    t, h, w, _ = frames.shape
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "10", "preset": "veryfast"}
        for k in range(t):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[k]), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _entries(paths) -> list[VideoEntry]:
    return [VideoEntry(p, label=i) for i, p in enumerate(paths)]


def _loader(paths, batch_size=None, *, num_frames=4, size=32, flip=True, prefetch=0, dtype=torch.float32,
            rank=0, world=1, seed=0, device="cpu", **entry_kw):
    entries = [VideoEntry(p, label=i, flip=flip, **entry_kw) for i, p in enumerate(paths)]
    sampler = ShardedBatchSampler(len(entries), batch_size or len(entries), rank, world, seed)
    return DaliVideoLoader(entries, sampler, num_frames=num_frames, size=size, device=device, device_id=0,
                           dtype=dtype, num_threads=2, prefetch=prefetch)


# ----------------------------------------------------------------------------- the plan
def test_plan_draws_in_pyav_order():
    """TSN indices, then crop pair / y / x, then one flip draw only when flipping is allowed."""
    for seed in range(20):
        plan = plan_train_clip(50, 48, 64, 8, 32, flip=True, rng=np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        idx = tsn_indices(50, 8, rng)
        assert np.array_equal(plan.indices, idx)
        # The crop comes from the next draws: replayed by hand (sizes for min side 48, out 32).
        sizes = [48, 42, 36, 32]  # int(48 * s) for 1, .875, .75, .66 = 31 -> snapped to 32
        pairs = [(sizes[j], sizes[i]) for i in range(4) for j in range(4) if abs(i - j) <= 1]
        cw, ch = pairs[int(rng.integers(len(pairs)))]
        y0, x0 = int(rng.integers(48 - ch + 1)), int(rng.integers(64 - cw + 1))
        assert (plan.y0, plan.x0, plan.crop_h, plan.crop_w) == (y0, x0, ch, cw)
        assert plan.flip == bool(rng.random() < 0.5)
        no_flip = plan_train_clip(50, 48, 64, 8, 32, flip=False, rng=np.random.default_rng(seed))
        assert not no_flip.flip and np.array_equal(no_flip.indices, plan.indices)
        assert (no_flip.y0, no_flip.x0, no_flip.crop_h, no_flip.crop_w) == (y0, x0, ch, cw)
    seg = plan_train_clip(10, 48, 64, 4, 32, rng=np.random.default_rng(3), first_frame=20)
    assert np.array_equal(seg.indices, 20 + tsn_indices(10, 4, np.random.default_rng(3)))
    with pytest.raises(ValueError, match="rng"):
        plan_train_clip(10, 48, 64, 4, 32)


def test_probe(clips):
    for key, codec in [("num_vp9", "vp9"), ("num_mjpeg", "mjpeg"), ("h264", "h264")]:
        with open(clips[key], "rb") as f:
            p = probe_video(f.read())
        assert (p.num_frames, p.height, p.width, p.codec) == (12, 48, 64, codec)
        assert p.duration_s == pytest.approx(12 / 25)  # WebM: from the packets' timestamps


# ----------------------------------------------------------------------------- DALI CPU vs PyAV
@pytest.mark.parametrize("key,num_frames", [("num_vp9", 4), ("num_mjpeg", 8), ("short_vp9", 8)])
def test_same_frames_as_pyav(clips, key, num_frames):
    """For the same (index, seed) DALI decodes exactly the frames the PyAV path decodes."""
    path = clips[key]
    ds = VideoListDataset(_entries([path]), num_frames=num_frames, size=32)
    loader = _loader([path], num_frames=num_frames)
    seen = set()
    for seed in range(8):
        batch = loader.load_batch([(0, seed)])
        assert batch["num_bad"] == 0 and batch["video"].shape == (1, 3, num_frames, 32, 32)
        got = frames_of(batch["video"][0])
        want = frames_of(ds[(0, seed)]["video"])
        assert got == want, f"seed {seed}: DALI took frames {got}, PyAV {want}"
        seen.add(tuple(got))
    if key == "short_vp9":  # 5 frames for 8 slots: a fixed, repeating pattern
        assert seen == {(0, 0, 1, 1, 2, 3, 3, 4)}
    else:
        assert len(seen) > 1  # the draws do depend on the seed


@pytest.mark.parametrize("key,flip", [("smooth_vp9", True), ("smooth_vp9", False), ("smooth_mjpeg", True)])
def test_close_to_pyav_with_same_crop_and_flip(clips, key, flip):
    """DALI's crop + resize + mirror + normalise matches the PyAV item for the same seed.

    Tolerance, in 0..255 units: max 8 and mean 2.5 per element. The YUV -> RGB conversions
    differ by up to a few levels (DALI's vs swscale), and DALI's ROI resize reads pixels
    just outside the crop at its edges where torch clamps. A crop one pixel off or a wrong
    mirror is far outside this.
    """
    path = clips[key]
    ds = VideoListDataset(_entries([path]), num_frames=4, size=32, flip=flip)
    loader = _loader([path], num_frames=4, flip=flip)
    flips = set()
    for seed in range(10):
        got = to_255(loader.load_batch([(0, seed)])["video"][0])
        want = to_255(ds[(0, seed)]["video"])
        diff = (got - want).abs()
        assert diff.max() <= 8 and diff.mean() <= 2.5, f"seed {seed}: max {diff.max():.1f}, mean {diff.mean():.2f}"
        assert (got - want.flip(-1)).abs().mean() > 10  # the content is not mirror-symmetric
        flips.add(loader._prepare(0, seed, loader.entries[0]).plan.flip)
    assert flips == ({False, True} if flip else {False})


def test_segment_and_min_frames_as_pyav(clips):
    """start_s / end_s map to the frames the PyAV path takes (12 frames over 0.48 s:
    [0.2, 0.4] s is frames 5..9); a segment outside the video and one of fewer than
    min_frames frames ([0, 0.16] s: 4 frames) are bad samples."""
    path = clips["num_vp9"]
    entries = [VideoEntry(path, start_s=0.2, end_s=0.4), VideoEntry(path, start_s=3.0, end_s=4.0),
               VideoEntry(path, start_s=0.0, end_s=0.16)]
    ds = VideoListDataset(entries, num_frames=4, size=32, min_frames=5)
    loader = DaliVideoLoader(entries, ShardedBatchSampler(3, 3, 0, 1, 0), num_frames=4, size=32, device="cpu",
                             num_threads=1, prefetch=0, min_frames=5)
    for seed in range(6):
        batch = loader.load_batch([(0, seed), (1, seed), (2, seed)])
        assert batch["index"].tolist() == [0] and batch["num_bad"] == 2
        frames = frames_of(batch["video"][0])
        assert all(5 <= k <= 9 for k in frames)
        assert frames == frames_of(ds[(0, seed)]["video"])
        assert ds[(1, seed)] is None and ds[(2, seed)] is None


# ----------------------------------------------------------------------------- bad input
def test_bad_files_are_skipped_counted_and_named(clips, caplog):
    bad = ["truncated_mjpeg", "empty", "missing", "h264", "corrupt"]
    paths = [clips["num_vp9"]] + [clips[k] for k in bad] + [clips["smooth_mjpeg"]]
    loader = _loader(paths, num_frames=4)
    keys = [(i, 7) for i in range(len(paths))]
    with caplog.at_level(logging.WARNING, logger="ivfast.data"):
        batch = loader.load_batch(keys)
    assert batch["num_bad"] == len(bad)
    assert batch["index"].tolist() == [0, len(paths) - 1] and batch["label"].tolist() == [0, len(paths) - 1]
    assert batch["video"].shape == (2, 3, 4, 32, 32) and torch.isfinite(batch["video"]).all()
    warned = " | ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for k in bad:
        assert clips[k] in warned, f"no warning names {k}"
    assert "not supported by DALI's CPU decoder" in warned
    # The good samples are the same as when decoded without the bad ones around them.
    alone = loader.load_batch([keys[0]])
    assert torch.allclose(alone["video"][0], batch["video"][0])
    # A batch with nothing readable.
    none = loader.load_batch([(1, 0), (2, 0)])
    assert none["video"] is None and none["num_bad"] == 2 and none["index"].numel() == 0


# ----------------------------------------------------------------------------- epochs
def _epoch(loader) -> list[dict]:
    return list(loader)


def test_epochs_are_sharded_seeded_and_prefetched(clips):
    paths = [clips["num_vp9"], clips["num_mjpeg"], clips["smooth_vp9"], clips["smooth_mjpeg"], clips["short_vp9"],
             clips["empty"]]
    ranks = [_loader(paths, 1, world=2, rank=r, prefetch=2, dtype=torch.bfloat16, seed=5) for r in range(2)]
    seen = []
    for r, loader in enumerate(ranks):
        batches = _epoch(loader)
        assert len(batches) == len(loader) == 3
        order = [keys for keys in loader.sampler]
        for b, keys in zip(batches, order):
            idx = keys[0][0]
            if paths[idx] == clips["empty"]:
                assert b["video"] is None and b["num_bad"] == 1
                continue
            assert b["num_bad"] == 0 and b["index"].tolist() == [idx] and b["label"].tolist() == [idx]
            assert b["video"].dtype == torch.bfloat16 and b["video"].shape == (1, 3, 4, 32, 32)
            # The same clip as the synchronous loader makes for that (index, seed).
            ref = _loader(paths, 1).load_batch(keys)["video"]
            assert torch.allclose(b["video"].float(), ref, atol=0.05)
        seen += [k[0][0] for k in order]
    assert sorted(seen) == list(range(len(paths)))  # the two ranks split the epoch
    # Another epoch is another order; the same epoch again is the same order.
    loader = ranks[0]
    first = [b["index"].tolist() for b in _epoch(loader)]
    loader.sampler.set_position(1)
    assert [b["index"].tolist() for b in _epoch(loader)] != first
    loader.sampler.set_position(0)
    assert [b["index"].tolist() for b in _epoch(loader)] == first
    loader.sampler.set_position(0, 2)  # resumed at batch 2 of epoch 0
    assert [b["index"].tolist() for b in _epoch(loader)] == first[2:]


def _loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ivfast-dali-loader"]


def test_abandoned_epochs_stop_their_thread(clips):
    paths = [clips["num_vp9"], clips["smooth_vp9"]] * 6
    loader = _loader(paths, 1, prefetch=2)
    before = set(_loader_threads())
    it = iter(loader)
    next(it)
    it2 = iter(loader)  # a new epoch stops the previous one
    assert not [t for t in _loader_threads() if t not in before and t is not it2._thread]
    next(it2)
    thread = it2._thread
    del it, it2
    gc.collect()  # an abandoned, unreferenced epoch stops its thread
    thread.join(timeout=10)
    assert not thread.is_alive()
    # The loader still works afterwards, and a finished epoch leaves no thread behind.
    assert len(_epoch(loader)) == len(paths)
    assert set(_loader_threads()) <= before


def test_constructor_errors(clips):
    entries = [VideoEntry(clips["num_vp9"])]
    sampler = ShardedBatchSampler(1, 1, 0, 1, 0)
    with pytest.raises(ValueError, match="device"):
        DaliVideoLoader(entries, sampler, num_frames=4, size=32, device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        DaliVideoLoader(entries, sampler, num_frames=4, size=32, device="cpu", dtype=torch.int8)
    with pytest.raises(ValueError, match="sampler covers"):
        DaliVideoLoader(entries * 2, sampler, num_frames=4, size=32, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            DaliVideoLoader(entries, sampler, num_frames=4, size=32, device="gpu")


# ----------------------------------------------------------------------------- GPU
@NEEDS_CUDA
def test_gpu_h264_bf16_on_cuda(tmp_path):
    """NVDEC decodes H.264 (which DALI's CPU decoder cannot) straight into bf16 on the GPU,
    with the frames and crops of the PyAV path. The clips are 192x144: NVDEC has minimum
    frame sizes (128x128 for VP9)."""
    w, h = 192, 144
    paths = [_write_h264(str(tmp_path / "num.mp4"), numbered_frames(12, w, h)),
             write_video(str(tmp_path / "smooth.webm"), _smooth_frames(16, w, h), "libvpx-vp9"),
             _write_h264(str(tmp_path / "smooth.mp4"), _smooth_frames(16, w, h)),
             str(tmp_path / "missing.mp4")]
    loader = _loader(paths, 4, device="gpu", dtype=torch.bfloat16, prefetch=2)
    (batch,) = _epoch(loader)
    assert batch["num_bad"] == 1 and batch["video"].shape == (3, 3, 4, 32, 32)
    assert batch["video"].dtype == torch.bfloat16 and batch["video"].device == torch.device("cuda", 0)
    ds = VideoListDataset(_entries(paths[:3]), num_frames=4, size=32)
    seeds = dict(next(iter(loader.sampler)))
    for row, idx in enumerate(batch["index"].tolist()):
        want = ds[(idx, seeds[idx])]["video"]
        got = batch["video"][row]
        if idx == 0:
            assert frames_of(got) == frames_of(want)
        diff = (to_255(got) - to_255(want)).abs()
        # NVDEC's YUV -> RGB and bf16 rounding (~1 level near 255) on top of the CPU tolerance.
        assert diff.mean() <= 3.0 and diff.max() <= 12, f"{paths[idx]}: max {diff.max():.1f}, mean {diff.mean():.2f}"
