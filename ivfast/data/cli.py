"""``ivfast-data check`` (decode every video of a list, report the bad ones) and ``ivfast-data
prepare`` (re-encode a list's videos for fast training reads, write the new list)."""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from fractions import Fraction

from ivfast.data.decode_timeout import time_limit
from ivfast.data.lists import FORMATS, ListFile, format_list, parse_list
from ivfast.data.video_list import failure_reason, open_video


@dataclass
class VideoReport:
    """What ``check_video`` found: readable or not (``reason``), size, frames, notes."""

    path: str
    ok: bool
    reason: str = ""
    frames: int = 0
    width: int = 0
    height: int = 0
    notes: list[str] = field(default_factory=list)


def check_video(path: str, timeout_s: float = 60.0, min_frames: int = 1) -> VideoReport:
    """Decode every frame of ``path``; never raises for a bad video.

    Bad: missing, empty, not a video, no video stream, zero or fewer than ``min_frames``
    frames, a decoding error, decoding longer than ``timeout_s``. Notes for a readable
    video: a first frame after time 0, a variable frame rate, a header that states more
    frames than decode (frames are counted in decode order when training).
    """
    rep = VideoReport(path, ok=False)
    times: list[float] = []
    try:
        with time_limit(timeout_s) as deadline:
            with open_video(path, timeout_s) as container:
                stream = container.streams.video[0]
                header_frames = int(stream.frames or 0)
                for frame in container.decode(stream):
                    rep.frames += 1
                    rep.width, rep.height = frame.width, frame.height
                    if frame.time is not None:
                        times.append(float(frame.time))
                    deadline.check()
    except Exception as e:  # noqa: BLE001 - every failure is a report line
        rep.reason = failure_reason(e)
        return rep
    if rep.frames == 0:
        rep.reason = "zero frames"
        return rep
    if rep.frames < min_frames:
        rep.reason = f"too short: {rep.frames} frames, fewer than --min-frames {min_frames}"
        return rep
    rep.ok = True
    if times and times[0] > 1e-3:
        rep.notes.append(f"first frame at {times[0]:.3f} s (frames are counted in decode order)")
    steps = [b - a for a, b in zip(sorted(times), sorted(times)[1:])]
    if steps and min(steps) > 0 and max(steps) > 1.5 * min(steps):
        rep.notes.append(f"variable frame rate (frame intervals {1e3 * min(steps):.1f} to {1e3 * max(steps):.1f} ms)")
    if header_frames > rep.frames:
        rep.notes.append(f"the header states {header_frames} frames, {rep.frames} decode (truncated?)")
    return rep


def _unique_paths(lst: ListFile) -> list[str]:
    return list(dict.fromkeys(e.path for e in lst.entries))


def _pool(workers: int) -> ProcessPoolExecutor:
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def _run_all(fn, jobs: list[tuple], workers: int, desc: str) -> list:
    """``fn(*job)`` for every job, in ``workers`` processes (inline for 1), with a progress bar."""
    from tqdm import tqdm

    results: list = [None] * len(jobs)
    with tqdm(total=len(jobs), desc=desc, unit="video", disable=None, file=sys.stderr) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                results[i] = fn(*job)
                bar.update(1)
            return results
        with _pool(min(workers, len(jobs))) as pool:
            futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update(1)
    return results


def check(list_file: str, root: str = "", fmt: str = "auto", workers: int = 1, timeout_s: float = 60.0,
          min_frames: int = 1, out=None) -> list[VideoReport]:
    """Check every video of a list (a path listed twice is decoded once) in ``workers`` processes.

    Prints to ``out`` (default stdout) one ``BAD`` line per unreadable video with the
    reason, one ``NOTE`` line per note of a readable one (``check_video``), then a summary
    line; returns the reports.
    """
    out = out or sys.stdout
    lst = parse_list(list_file, root, fmt)
    paths = _unique_paths(lst)
    reports = _run_all(check_video, [(p, timeout_s, min_frames) for p in paths], workers, "check")
    bad = [r for r in reports if not r.ok]
    noted = [r for r in reports if r.ok and r.notes]
    for r in bad:
        print(f"BAD  {r.path}: {r.reason}", file=out)
    for r in noted:
        for note in r.notes:
            print(f"NOTE {r.path}: {note}", file=out)
    missing = sum(r.reason == "file not found" for r in bad)
    print(f"{list_file}: checked {len(reports)} videos ({len(lst.lines)} list lines): {len(reports) - len(bad)} "
          f"readable, {len(bad)} bad ({missing} missing), {len(noted)} with notes", file=out)
    return reports


# ----------------------------------------------------------------------------- prepare


@dataclass(frozen=True)
class EncodeOptions:
    short_side: int = 320
    fps: float = 25.0
    gop: int = 16
    codec: str = "libx264"
    crf: int = 20
    preset: str = "veryfast"
    threads: int = 1  # encoder threads (0: FFmpeg's choice); 1 when videos are encoded in parallel processes


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """``(w, h)``: scaled so that the short side is at most ``short_side`` (never up), rounded down to even."""
    scale = min(1.0, short_side / min(width, height)) if short_side > 0 else 1.0
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def output_names(paths_as_written: list[str]) -> dict[str, str]:
    """Map each list path (as written) to its output path relative to OUT_DIR.

    The output path is the list path with the extension ``.mp4`` (an absolute path loses
    its leading ``/``, ``..`` becomes ``_up_``), or ``name.ext.mp4`` where two sources would
    collide.
    """

    def rel(p: str) -> str:
        p = os.path.splitdrive(p)[1].replace("\\", "/")
        parts = [("_up_" if s == ".." else s) for s in os.path.normpath(p).split(os.sep) if s not in ("", ".")]
        return "/".join(parts) if parts else "video"

    base = {p: rel(p) for p in dict.fromkeys(paths_as_written)}
    first = {p: os.path.splitext(r)[0] + ".mp4" for p, r in base.items()}
    owners: dict[str, set] = {}
    for p, o in first.items():
        owners.setdefault(o, set()).add(p)
    names = {p: (o if len(owners[o]) == 1 else base[p] + ".mp4") for p, o in first.items()}
    if len(set(names.values())) != len(names):
        raise ValueError("two list paths map to the same output name; rename one of them")
    return names


def _encode(src: str, dst: str, opt: EncodeOptions) -> int:
    """Re-encode ``src`` to ``dst`` (MP4); returns the frames written.

    Constant frame rate ``opt.fps`` (0: the source's mean rate; frames are repeated or
    dropped by timestamp), a keyframe every ``opt.gop`` frames and no B-frames (cheap
    random access), the index at the front, short side at most ``opt.short_side`` (never
    upscaled) and even dimensions (4:2:0 chroma needs them), no audio.
    """
    import av
    from av.video.reformatter import VideoReformatter

    with open_video(src) as inp:
        ist = inp.streams.video[0]
        src_rate = ist.average_rate or ist.guessed_rate
        rate = Fraction(opt.fps).limit_denominator(1001) if opt.fps > 0 else Fraction(src_rate or 25)
        with av.open(dst, "w", format="mp4", container_options={"movflags": "+faststart"}) as out:
            ost, size = None, None
            k, t0, last_t, n_in = 0, None, 0.0, 0
            prev = None
            scaler = VideoReformatter()

            def emit(frame, upto: float) -> None:
                nonlocal k
                conv = None
                while k / rate < upto - 1e-6:
                    if conv is None:  # full-range (JPEG) input to the limited range players assume
                        full = frame.format.name.startswith("yuvj") or frame.color_range == 2
                        conv = scaler.reformat(frame, width=size[0], height=size[1], format="yuv420p",
                                               interpolation="AREA", src_color_range="JPEG" if full else "MPEG",
                                               dst_color_range="MPEG")
                    conv.pts, conv.time_base = k, ost.codec_context.time_base
                    for packet in ost.encode(conv):
                        out.mux(packet)
                    k += 1

            for frame in inp.decode(ist):
                if ost is None:
                    size = output_size(frame.width, frame.height, opt.short_side)
                    ost = out.add_stream(opt.codec, rate=rate)
                    ost.width, ost.height, ost.pix_fmt = size[0], size[1], "yuv420p"
                    ost.codec_context.time_base = 1 / rate
                    ost.codec_context.gop_size = opt.gop
                    ost.codec_context.max_b_frames = 0
                    ost.codec_context.thread_count = opt.threads
                    if opt.codec == "libx264":
                        ost.options = {"crf": str(opt.crf), "preset": opt.preset}
                t = float(frame.time) if frame.time is not None else n_in / float(src_rate or rate)
                t0 = t if t0 is None else t0
                t = max(t - t0, last_t)  # never backwards
                if prev is not None:
                    emit(prev, t)
                prev, last_t, n_in = frame, t, n_in + 1
            if prev is None:
                return 0
            interval = last_t / (n_in - 1) if n_in > 1 and last_t > 0 else 1 / float(src_rate or rate)
            emit(prev, last_t + interval)
            if k == 0:  # a single frame shorter than one output interval: keep it
                emit(prev, 1 / rate)
            for packet in ost.encode():
                out.mux(packet)
    return k


def prepare_video(src: str, dst: str, opt: EncodeOptions) -> tuple[str, str]:
    """``("skipped" | "done" | "bad", reason)``: encode one video unless its output exists."""
    if os.path.isfile(dst) and os.path.getsize(dst) > 0:
        return "skipped", ""
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    tmp = dst + ".partial"
    try:
        n = _encode(src, tmp, opt)
        if n == 0:
            raise ValueError("zero decodable frames")
        os.replace(tmp, dst)
    except Exception as e:  # noqa: BLE001 - a bad input is reported and left out
        if os.path.exists(tmp):
            os.remove(tmp)
        return "bad", failure_reason(e)
    return "done", ""


def prepare(list_file: str, out_dir: str, root: str = "", fmt: str = "auto", opt: EncodeOptions = EncodeOptions(),
            workers: int = 1, list_out: str = "", out=None) -> tuple[str, dict]:
    """Re-encode the videos of a list into ``out_dir`` and write the new list; returns (list path, counts).

    Outputs (``_encode``, names from ``output_names``) are written to ``NAME.partial`` and
    renamed when complete, and outputs that exist are skipped, so a run resumes. Unreadable
    inputs are reported and left out. The new list (LIST's format, paths relative to
    ``out_dir``: train with ``data.root`` = ``out_dir``) is written atomically to
    ``list_out`` (default ``out_dir/<LIST's file name>``).
    """
    out = out or sys.stdout
    lst = parse_list(list_file, root, fmt)
    written = [ln.fields[ln.path_field] for ln in lst.lines]
    names = output_names(written)
    src_of = {ln.fields[ln.path_field]: ln.entry.path for ln in lst.lines}
    order = list(names)
    jobs = [(src_of[w], os.path.join(out_dir, names[w]), opt) for w in order]
    os.makedirs(out_dir, exist_ok=True)
    results = dict(zip(order, _run_all(prepare_video, jobs, workers, "prepare")))
    counts = {"done": 0, "skipped": 0, "bad": 0}
    for w in order:
        status, reason = results[w]
        counts[status] += 1
        if status == "bad":
            print(f"BAD  {src_of[w]}: {reason} (left out)", file=out)
    kept = [ln.with_path(names[ln.fields[ln.path_field]]) for ln in lst.lines
            if results[ln.fields[ln.path_field]][0] != "bad"]
    list_out = list_out or os.path.join(out_dir, os.path.basename(list_file))
    tmp = f"{list_out}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(format_list(lst, kept))
    os.replace(tmp, list_out)
    print(f"{list_file}: {len(order)} videos: {counts['done']} encoded, {counts['skipped']} already done, "
          f"{counts['bad']} bad; new list {list_out} ({len(kept)} lines, paths relative to {out_dir}: "
          f"set data.root to it)", file=out)
    return list_out, {**counts, "lines": len(kept)}


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ivfast-data", description="Check or prepare the videos of a dataset list.")
    sub = p.add_subparsers(dest="cmd", required=True)
    workers = max(1, (os.cpu_count() or 1))

    def common(s):
        s.add_argument("list", help="the dataset list (release, plain or CSV format)")
        s.add_argument("--root", default="", help="directory that relative paths of the list are under")
        s.add_argument("--format", default="auto", choices=FORMATS, help="list format (default: detect)")
        s.add_argument("--workers", type=int, default=workers, help=f"parallel processes (default {workers})")

    c = sub.add_parser("check", help="decode every video and report the bad ones")
    common(c)
    c.add_argument("--strict", action="store_true", help="exit status 1 when any video is bad")
    c.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per video (0: no limit)")
    c.add_argument("--min-frames", type=int, default=1, help="fewer decodable frames than this is bad")
    r = sub.add_parser("prepare", help="re-encode the videos for training and write the new list")
    common(r)
    r.add_argument("out_dir", help="where the re-encoded videos and the new list go")
    r.add_argument("--short-side", type=int, default=320, help="cap on the short side in pixels (0: keep)")
    r.add_argument("--fps", type=float, default=25.0, help="constant output frame rate (0: the source's mean)")
    r.add_argument("--gop", type=int, default=16, help="frames between keyframes")
    r.add_argument("--codec", default="libx264", help="encoder (libx264 is H.264, which the GPU decoder reads)")
    r.add_argument("--crf", type=int, default=20, help="libx264 quality (lower is better)")
    r.add_argument("--preset", default="veryfast", help="libx264 speed preset")
    r.add_argument("--list-out", default="", help="path of the new list (default OUT_DIR/<list file name>)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    if args.cmd == "prepare" and (args.gop < 1 or args.short_side < 0 or args.fps < 0):
        p.error("--gop must be >= 1, --short-side and --fps >= 0")
    return args


def main(argv=None) -> int:
    """Exit status: 2 when the list cannot be read; ``check``: 1 with ``--strict`` when any video
    is bad, else 0; ``prepare``: 1 when no video could be prepared, else 0."""
    args = parse_args(argv)
    try:
        if args.cmd == "check":
            reports = check(args.list, args.root, args.format, args.workers, args.timeout, args.min_frames)
            return 1 if args.strict and any(not r.ok for r in reports) else 0
        opt = EncodeOptions(args.short_side, args.fps, args.gop, args.codec, args.crf, args.preset,
                            threads=0 if args.workers == 1 else 1)
        _, counts = prepare(args.list, args.out_dir, args.root, args.format, opt, args.workers, args.list_out)
        return 0 if counts["lines"] > 0 else 1
    except (OSError, ValueError) as e:
        print(f"ivfast-data: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
