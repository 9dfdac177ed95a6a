"""Benchmark: training clips per second from each data backend, Stage-1 clip shape.

    pytest benchmarks/bench_data.py --benchmark-enable -q
    python benchmarks/bench_data.py [--quick] [--write]     (--quick: the tiny run the tests do)

Work measured: batches of training clips (16 frames x 224 x 224, TSN-sampled, multi-scale
crop, flip, normalised, float32, ``collate_skip_bad``), pulled from the loader as the
training loop does, then moved to the GPU (when there is one) and synchronised: the
clips/s a training run could be fed. Warm-up batches (worker start-up, and the burst of
batches every worker finishes at once after it) are not timed.

Backends: ``pyav`` (``VideoListDataset`` in N persistent DataLoader worker processes,
pinned memory on a GPU machine), ``dali`` (``DaliVideoLoader``; skipped with the reason
unless ``nvidia.dali`` imports and a GPU is present), ``synthetic`` (generated clips, no
decoding: the ceiling of the host side).

Sources (generated): H.264 (libx264 veryfast, crf 23, keyframe every 16 frames, no
B-frames: what ``ivfast-data prepare`` writes) at 320p (568 x 320) and 720p (1280 x 720),
25 fps, a scrolling textured image with noise. GPU: 16 videos of 4 s per size, listed 128
times, batches of 16 (2 x workers warm-up, max(20, 3 x workers) timed), workers half and
all but two of the cores. CPU: 2 videos of 1 s per size, 2 timed batches of 2, 2 workers:
only proves the script runs.

Goal (issue 4): decode at least 2x the clips/s one GPU trains at; compare ``clips_per_s``
here with ``clips_per_s`` in a run's ``metrics.jsonl`` (whose ``data_share`` is the share
of step time spent waiting for data). Results: benchmarks/results/data-<gpu|cpu>-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402

FRAMES, SIZE, FPS, GOP = 16, 224, 25, 16
SOURCES = {"320p": (568, 320), "720p": (1280, 720)}


@dataclass(frozen=True)
class Plan:
    videos: int       # distinct source videos per size
    seconds: float    # length of each
    repeats: int      # times the list names each video
    batch: int
    warmup: int       # untimed batches first (worker start-up, the first burst of prefetched batches)
    batches: int      # timed batches
    workers: tuple    # pyav / synthetic DataLoader worker counts


def plan(quick: bool) -> Plan:
    if quick or not harness.on_gpu():
        return Plan(videos=2, seconds=1.0, repeats=4, batch=2, warmup=1, batches=2, workers=(2,))
    cpus = os.cpu_count() or 8
    workers = tuple(sorted({max(1, cpus // 2), max(1, cpus - 2)}))
    return Plan(videos=16, seconds=4.0, repeats=128, batch=16, warmup=2 * max(workers),
                batches=max(20, 3 * max(workers)), workers=workers)


def write_source(path: str, width: int, height: int, seconds: float, seed: int) -> str:
    """One generated H.264 clip (see the module docstring)."""
    import av

    rng = np.random.default_rng(seed)
    tile = rng.integers(0, 256, (height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
    base = np.kron(tile, np.ones((40, 40, 1), dtype=np.uint8))[:height + 80, :width + 80]
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size, stream.codec_context.max_b_frames = GOP, 0
        stream.codec_context.thread_count = 1  # no encoder threads alive when the loaders fork
        stream.options = {"crf": "23", "preset": "veryfast"}
        for k in range(int(seconds * FPS)):
            dy, dx = (2 * k) % 80, (3 * k) % 80
            img = base[dy:dy + height, dx:dx + width].astype(np.int16) + rng.integers(-8, 9, (height, width, 1))
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_sources(root: str, p: Plan) -> dict[str, list]:
    """``{size name: [VideoEntry, ...]}``: p.videos clips per size, each listed p.repeats times."""
    from ivfast.data.lists import VideoEntry

    out = {}
    for name, (w, h) in SOURCES.items():
        paths = [write_source(os.path.join(root, f"{name}_{i}.mp4"), w, h, p.seconds, i) for i in range(p.videos)]
        out[name] = [VideoEntry(path, label=i % 10) for i, path in enumerate(paths * p.repeats)]
    return out


def _loader(backend: str, entries, p: Plan, workers: int):
    from torch.utils.data import DataLoader

    from ivfast.data.collate import collate_skip_bad
    from ivfast.data.loader import ShardedBatchSampler

    n = len(entries) if backend != "synthetic" else p.batch * (p.warmup + p.batches)
    sampler = ShardedBatchSampler(n, p.batch, 0, 1, seed=0)
    if backend == "dali":
        if not harness.on_gpu():
            pytest.skip("dali: needs a GPU")
        try:
            import nvidia.dali  # noqa: F401

            from ivfast.data.dali_loader import DaliVideoLoader
        except ImportError as e:
            pytest.skip(f"dali: not importable here ({e})")
        from ivfast.data.transforms import DEFAULT_SCALES, IMAGENET_MEAN, IMAGENET_STD

        return DaliVideoLoader(list(entries), sampler, num_frames=FRAMES, size=SIZE, scales=DEFAULT_SCALES,
                               mean=IMAGENET_MEAN, std=IMAGENET_STD, device="gpu",
                               device_id=torch.cuda.current_device(), dtype=torch.float32, num_threads=4, prefetch=2)
    if backend == "synthetic":
        from ivfast.data.synthetic import SyntheticClips

        dataset = SyntheticClips(num_clips=n, num_frames=FRAMES, size=SIZE)
    else:
        from ivfast.data.video_list import VideoListDataset

        dataset = VideoListDataset(list(entries), num_frames=FRAMES, size=SIZE, decode_timeout_s=60.0)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_skip_bad,
                      pin_memory=harness.on_gpu(), persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None)


def measure(backend: str, source: str, entries, p: Plan, workers: int) -> dict:
    """Clips per second over ``p.batches`` batches after ``p.warmup`` untimed ones; one result row."""
    loader = _loader(backend, entries, p, workers)
    dev = harness.bench_device()
    it = iter(loader)
    for _ in range(p.warmup):
        first = next(it)
        assert first["video"] is not None and tuple(first["video"].shape[1:]) == (3, FRAMES, SIZE, SIZE)
    clips, bad = 0, 0
    t0 = time.perf_counter()
    for _ in range(p.batches):
        batch = next(it)
        bad += batch["num_bad"]
        if batch["video"] is not None:
            batch["video"].to(dev, non_blocking=True)
            clips += batch["video"].shape[0]
    harness.sync()
    seconds = time.perf_counter() - t0
    del it, loader
    return {"backend": backend, "source": source, "workers": workers if backend != "dali" else None,
            "batch": p.batch, "clips": clips, "bad": bad, "seconds": round(seconds, 3),
            "clips_per_s": round(clips / seconds, 1)}


def config(p: Plan) -> dict:
    return {"clip": f"{FRAMES}x{SIZE}x{SIZE} float32", "sources": {k: f"{w}x{h}" for k, (w, h) in SOURCES.items()},
            "codec": f"libx264 veryfast crf 23, gop {GOP}, no B-frames, {FPS} fps", "videos_per_size": p.videos,
            "seconds_per_video": p.seconds, "warmup_batches": p.warmup, "timed_batches": p.batches, "batch": p.batch,
            "timing": "perf_counter over the timed batches, after the warm-up ones; H2D copy included on a GPU",
            "cpus": os.cpu_count()}


def cases(p: Plan) -> list[tuple[str, int]]:
    return [("pyav", w) for w in p.workers] + [("dali", 0)] + [("synthetic", w) for w in p.workers]


# ----------------------------------------------------------------------------- pytest-benchmark
PLAN = plan(quick=False)
_ROWS: list[dict] = []


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    yield make_sources(str(tmp_path_factory.mktemp("bench_data")), PLAN)
    if _ROWS:
        print("\nresults:", harness.write_results("data", config(PLAN), _ROWS))


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("backend, workers", cases(PLAN), ids=lambda v: str(v))
def test_data_throughput(benchmark, sources, backend, workers, source):
    if backend == "synthetic" and source != "320p":
        pytest.skip("synthetic clips have no source video: measured once")
    row = benchmark.pedantic(measure, args=(backend, source, sources[source], PLAN, workers), rounds=1, iterations=1)
    _ROWS.append(row)


# ----------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run (what the tests do)")
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/ (always on a GPU without --quick)")
    args = ap.parse_args(argv)
    p = plan(args.quick)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        srcs = make_sources(root, p)
        for backend, workers in cases(p):
            for source in (list(SOURCES) if backend != "synthetic" else ["320p"]):
                try:
                    rows.append(measure(backend, source, srcs[source], p, workers))
                except pytest.skip.Exception as e:
                    print(f"{backend}: skipped ({e.msg})")
                    break
    for r in rows:
        print(f"{r['backend']:>9} {r['source']:>5} workers={r['workers']}: {r['clips_per_s']:.1f} clips/s "
              f"({r['clips']} clips in {r['seconds']:.2f} s, {r['bad']} bad)")
    if args.write or (harness.on_gpu() and not args.quick):
        print("results:", harness.write_results("data", config(p), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
