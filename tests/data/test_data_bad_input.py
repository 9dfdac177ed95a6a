"""Video input edge cases: codecs and odd sizes, bad files, too-short clips, the decode time
limit, variable frame rate and non-zero start times, segments, per-video flip, and the
frame indices the DALI sampler plans against those PyAV decodes."""
from __future__ import annotations

import logging
import signal
import threading
import time

import numpy as np
import pytest
import torch

from ivfast.data import loader as loader_mod
from ivfast.data import video_list as vl
from ivfast.data.config import DataConfig
from ivfast.data.decode_timeout import DecodeTimeout, time_limit
from ivfast.data.lists import VideoEntry
from ivfast.data.sampling import tsn_indices
from ivfast.data.video_list import VideoListDataset, load_clip
from tests.clips import (
    frames_of,
    numbered_frames,
    write_corrupt,
    write_garbled,
    write_numbered_clip,
    write_timed_clip,
    write_truncated,
    write_video,
)

VFR_MS = [0, 40, 80, 200, 240, 400, 440, 480, 700, 740, 780, 820]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    good = write_numbered_clip(str(d / "good.mp4"), num_frames=12)
    return {
        "good": good,
        "vp9_odd": write_video(str(d / "odd.webm"), numbered_frames(12, 63, 47)),
        "mjpeg_odd": write_video(str(d / "odd.avi"), numbered_frames(12, 65, 35)),
        "three": write_numbered_clip(str(d / "three.mp4"), num_frames=3),
        "vfr": write_timed_clip(str(d / "vfr.mp4"), VFR_MS),
        "offset_mp4": write_timed_clip(str(d / "offset.mp4"), [2000 + 40 * k for k in range(12)]),
        "offset_mkv": write_timed_clip(str(d / "offset.mkv"), [2000 + 40 * k for k in range(12)]),
        "garbled": write_garbled(good, str(d / "garbled.mp4"), keep=1024),
        "truncated_mkv_header": write_truncated(write_numbered_clip(str(d / "full.mkv"), 12), str(d / "cut.mkv"), 0.02),
        "corrupt": write_corrupt(str(d / "corrupt.mkv")),
        "missing": str(d / "missing.mp4"),
        "dir": d,
    }


def _ds(paths, **kw):
    entries = [p if isinstance(p, VideoEntry) else VideoEntry(p, i) for i, p in enumerate(paths)]
    kw.setdefault("num_frames", 4)
    kw.setdefault("size", 32)
    return VideoListDataset(entries, **kw)


# ----------------------------------------------------------------------------- codecs, sizes, timing
@pytest.mark.parametrize("kind", ["vp9_odd", "mjpeg_odd", "vfr", "offset_mp4", "offset_mkv"])
def test_frames_are_counted_in_decode_order(clips, kind):
    """VP9 / MJPEG at odd sizes, a variable frame rate, a first frame at 2 s: the clip holds
    the TSN-chosen frames by their decode position, timestamps play no part."""
    ds = _ds([clips[kind]])
    for seed in range(4):
        assert frames_of(ds[(0, seed)]["video"]) == tsn_indices(12, 4, np.random.default_rng(seed)).tolist()
    assert frames_of(_ds([clips[kind]], train=False)[(0, 0)]["video"]) == tsn_indices(12, 4).tolist()


# ----------------------------------------------------------------------------- bad files
@pytest.mark.parametrize("kind", ["garbled", "truncated_mkv_header", "corrupt", "missing"])
def test_bad_files_are_skipped_with_a_warning_naming_them(clips, caplog, kind):
    ds = _ds([clips["good"], clips[kind]])
    with caplog.at_level(logging.WARNING, logger="ivfast.data"):
        assert ds[(1, 0)] is None
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and msgs[0].startswith(f"cannot read video {clips[kind]}: ")
    assert ds[(0, 0)] is not None


def test_too_short_videos(clips, caplog):
    """By default a 3-frame video repeats frames; with min_frames above 3 it is a bad video."""
    assert frames_of(_ds([clips["three"]])[(0, 1)]["video"]) == [0, 0, 1, 2]
    assert _ds([clips["three"]], min_frames=3)[(0, 1)] is not None
    with caplog.at_level(logging.WARNING, logger="ivfast.data"):
        assert _ds([clips["three"]], min_frames=4)[(0, 1)] is None
    assert "too short: 3 frames, fewer than data.min_frames = 4" in caplog.text
    with pytest.raises(ValueError, match="min_frames"):
        _ds([clips["three"]], min_frames=0)


# ----------------------------------------------------------------------------- decode time limit
def test_time_limit_interrupts_on_the_main_thread():
    assert threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGALRM)
    t0 = time.perf_counter()
    with pytest.raises(DecodeTimeout, match="more than 0.2 s"):
        with time_limit(0.2):
            time.sleep(5)
    assert time.perf_counter() - t0 < 2
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL)[0] == 0.0
    with time_limit(0.5) as d:  # a body that ends in time: nothing raised, the timer is cleared
        d.check()
    time.sleep(0.6)
    with time_limit(0):  # 0: no limit
        time.sleep(0.05)


def _slow_open(real_open, delay):
    class _Slow:
        def __init__(self, c):
            self._c, self.streams = c, c.streams

        def decode(self, stream):
            for frame in self._c.decode(stream):
                time.sleep(delay)
                yield frame

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self._c.close()

    return lambda path, *a, **k: _Slow(real_open(path, *a, **k))


def test_slow_decode_is_a_bad_video_in_the_main_thread(clips, monkeypatch, caplog):
    monkeypatch.setattr(vl, "open_video", _slow_open(vl.open_video, 0.1))
    ds = _ds([clips["good"]], decode_timeout_s=0.25)
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="ivfast.data"):
        assert ds[(0, 0)] is None
    assert time.perf_counter() - t0 < 1.0
    assert "DecodeTimeout" in caplog.text and clips["good"] in caplog.text


def test_slow_decode_off_the_main_thread_hits_the_per_frame_check(clips, monkeypatch):
    """Where no SIGALRM can be used, the per-frame deadline check stops the decode."""
    monkeypatch.setattr(vl, "open_video", _slow_open(vl.open_video, 0.1))
    out = {}

    def run():
        t0 = time.perf_counter()
        try:
            load_clip(clips["good"], 4, np.random.default_rng(0), 0, timeout_s=0.25)
        except DecodeTimeout as e:
            out["err"] = e
        out["t"] = time.perf_counter() - t0

    th = threading.Thread(target=run)
    th.start()
    th.join(10)
    assert isinstance(out.get("err"), DecodeTimeout) and out["t"] < 1.0


# ----------------------------------------------------------------------------- segments, flip
@pytest.mark.parametrize("kind", ["good", "offset_mkv"])
def test_segment_of_a_video(clips, kind):
    """12 frames at 25 fps (0.48 s); [0.25 s, end) with the length from the file (mp4: the
    header; mkv: the decoded timestamps) is frames int(25 * 0.25) = 6 .. 6 + int(25 * 0.23) = 11."""
    e = VideoEntry(clips[kind], start_s=0.25, end_s=None, total_s=None)
    ds = _ds([e], num_frames=3)
    for seed in range(4):
        assert frames_of(ds[(0, seed)]["video"]) == (6 + tsn_indices(5, 3, np.random.default_rng(seed))).tolist()
    # The list's total_time wins: 12 frames over 1.2 s is 10 fps; [0.3, 0.9) s is frames 3 .. 8.
    ds = _ds([VideoEntry(clips[kind], start_s=0.3, end_s=0.9, total_s=1.2)], num_frames=3, train=False)
    assert frames_of(ds[(0, 0)]["video"]) == (3 + tsn_indices(6, 3)).tolist()
    assert _ds([VideoEntry(clips[kind], start_s=5.0, end_s=6.0, total_s=1.2)])[(0, 0)] is None  # empty segment


def test_per_video_flip(tmp_path):
    """An entry with flip=False (SSv2) gives exactly the data.flip=false clip; flip=True mirrors some."""
    ramp = np.broadcast_to(np.linspace(0, 250, 64, dtype=np.uint8)[None, None, :, None], (8, 48, 64, 3)).copy()
    path = write_video(str(tmp_path / "ramp.mp4"), ramp)
    no_flip_entry = _ds([VideoEntry(path, flip=False)])
    no_flip_global = _ds([VideoEntry(path, flip=True)], flip=False)
    allowed = _ds([VideoEntry(path, flip=True)])
    mirrored = 0
    for seed in range(8):
        a, b, c = no_flip_entry[(0, seed)]["video"], no_flip_global[(0, seed)]["video"], allowed[(0, seed)]["video"]
        assert torch.equal(a, b)
        assert torch.equal(c, a) or torch.equal(c, a.flip(-1))
        mirrored += not torch.equal(c, a)
    assert 0 < mirrored < 8


# ----------------------------------------------------------------------------- DALI plan == PyAV frames
@pytest.mark.parametrize("segment", [None, (0.25, None)])
def test_dali_plan_takes_the_frames_pyav_decodes(clips, segment):
    """``clip_plan.plan_train_clip`` (what the DALI backend decodes) draws the same frame indices,
    for the same sample seed, as the PyAV path decodes: whole videos and segments."""
    clip_plan = pytest.importorskip("ivfast.data.clip_plan")
    from ivfast.data.lists import segment_frames

    entry = VideoEntry(clips["good"]) if segment is None else VideoEntry(clips["good"], start_s=segment[0])
    ds = _ds([entry], num_frames=4, size=32)
    first, count = segment_frames(entry, 12, duration_s=0.48)
    for seed in range(6):
        plan = clip_plan.plan_train_clip(count, 48, 64, 4, 32, ds.scales, flip=True, rng=np.random.default_rng(seed),
                                         first_frame=first)
        assert frames_of(ds[(0, seed)]["video"]) == plan.indices.tolist()


# ----------------------------------------------------------------------------- through the real loader
def test_pyav_backend_batches_skip_and_count_bad_videos(clips, tmp_path):
    """The configured path: a release-format list through build_dataset / build_loader with 2
    persistent workers; the bad videos are dropped from the batch and counted in num_bad."""
    names = ["good.mp4", "odd.webm", "corrupt.mkv", "missing.mp4", "odd.avi", "garbled.mp4", "vfr.mp4", "three.mp4"]
    (tmp_path / "anno.txt").write_text("".join(f"k710 {n} -1 -1 -1 {i}\n" for i, n in enumerate(names)))
    d = DataConfig(source="list", list_file=str(tmp_path / "anno.txt"), root=str(clips["dir"]), backend="pyav",
                   batch_size=8, num_workers=2, num_frames=4, img_size=56, min_frames=4)
    ds = loader_mod.build_dataset(d)
    loader, sampler = loader_mod.build_loader(d, ds, rank=0, world=1, seed=0, pin_memory=False)
    (batch,) = list(loader)
    assert batch["num_bad"] == 4  # corrupt, missing, garbled, three (too short)
    assert sorted(batch["label"].tolist()) == [0, 1, 4, 6]
    assert batch["video"].shape == (4, 3, 4, 56, 56)

