"""Benchmark: training clips per second from each data backend, Stage-1 clip shape.

    pytest benchmarks/bench_data.py --benchmark-enable -q
    python benchmarks/bench_data.py [--quick] [--write]     (--quick: the tiny run the tests do)
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
    """GPU: 16 videos of 4 s per size, each listed 128 times, batches of 16, workers half and all
    but two of the cores. CPU (or --quick): a tiny run that only proves the script works."""
    if quick or not harness.on_gpu():
        return Plan(videos=2, seconds=1.0, repeats=4, batch=2, warmup=1, batches=2, workers=(2,))
    cpus = os.cpu_count() or 8
    workers = tuple(sorted({max(1, cpus // 2), max(1, cpus - 2)}))
    return Plan(videos=16, seconds=4.0, repeats=128, batch=16, warmup=2 * max(workers),
                batches=max(20, 3 * max(workers)), workers=workers)


def write_source(path: str, width: int, height: int, seconds: float, seed: int) -> str:
    """A scrolling textured image with noise, H.264 as ``ivfast-data prepare`` writes it
    (veryfast, crf 23, a keyframe every GOP frames, no B-frames)."""
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
    """The loader ``build_loader`` gives a training run of ``backend`` over ``entries``."""
    from ivfast.data.config import DataConfig
    from ivfast.data.loader import build_loader

    if backend == "dali":
        if not harness.on_gpu():
            pytest.skip("dali: needs a GPU")
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            pytest.skip(f"dali: not importable here ({e})")
    d = DataConfig(source="synthetic" if backend == "synthetic" else "list", backend=backend, num_frames=FRAMES,
                   img_size=SIZE, batch_size=p.batch, num_workers=workers, decode_timeout_s=60.0)
    if backend == "synthetic":
        from ivfast.data.synthetic import SyntheticClips

        dataset = SyntheticClips(num_clips=p.batch * (p.warmup + p.batches), num_frames=FRAMES, size=SIZE)
    else:
        from ivfast.data.video_list import VideoListDataset

        dataset = VideoListDataset(list(entries), num_frames=FRAMES, size=SIZE, scales=tuple(d.scales), flip=d.flip,
                                   decode_timeout_s=d.decode_timeout_s, min_frames=d.min_frames)
    loader, _ = build_loader(d, dataset, rank=0, world=1, seed=0, pin_memory=harness.on_gpu(), dtype=torch.float32)
    return loader


def measure(backend: str, source: str, entries, p: Plan, workers: int) -> dict:
    """Clips per second over ``p.batches`` batches after ``p.warmup`` untimed ones; one result row.

    Batches are pulled as the training loop does, moved to the GPU (when there is one) and
    synchronised: the clips/s a run could be fed. The warm-up batches (worker start-up, and
    the burst every worker finishes at once after it) are not timed.
    """
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
    """pyav (DataLoader workers), dali (skipped without a GPU and nvidia.dali), synthetic (no
    decoding: the ceiling of the host side)."""
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
