"""``ivfast-data check`` and ``ivfast-data prepare`` on clips the tests write."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ivfast.data import cli
from ivfast.data.lists import parse_list
from tests.clips import (
    level_to_frame,
    numbered_frames,
    write_corrupt,
    write_empty,
    write_garbled,
    write_numbered_clip,
    write_timed_clip,
    write_truncated,
    write_video,
)

ROOT = Path(__file__).resolve().parents[2]
VFR_MS = [0, 40, 80, 200, 240, 400, 440, 480, 700, 740, 780, 820]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    good = write_numbered_clip(str(d / "h264.mp4"), num_frames=12, width=96, height=72)
    write_video(str(d / "vp9_odd.webm"), numbered_frames(10, 63, 47))
    write_video(str(d / "mjpeg_odd.avi"), numbered_frames(5, 65, 35))
    write_numbered_clip(str(d / "three.mp4"), num_frames=3)
    write_timed_clip(str(d / "vfr.mp4"), VFR_MS)
    write_timed_clip(str(d / "offset.mkv"), [2000 + 40 * k for k in range(12)])
    write_corrupt(str(d / "corrupt.mp4"))
    write_garbled(good, str(d / "garbled.mp4"))
    write_truncated(good, str(d / "truncated.mp4"), 0.5)
    write_empty(str(d / "empty.mp4"))
    os.makedirs(d / "sub", exist_ok=True)
    write_numbered_clip(str(d / "sub" / "h264.mkv"), num_frames=6)  # its output name collides with nothing
    return d


GOOD = ["h264.mp4", "vp9_odd.webm", "mjpeg_odd.avi", "three.mp4", "vfr.mp4", "offset.mkv", "sub/h264.mkv"]
BAD = ["corrupt.mp4", "garbled.mp4", "truncated.mp4", "empty.mp4", "missing.mp4"]


def _release_list(path: Path, names) -> str:
    lines = [f"{'ssv2' if i % 2 else 'k710'} {n} -1 -1 -1 {i}" for i, n in enumerate(names)]
    lines.insert(2, "ssv2 h264.mp4 0.48 0.1 0.3 99")  # the same video again, as a segment
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_check_reports_bad_files_notes_and_strict(src, tmp_path, capsys):
    lst = _release_list(tmp_path / "anno.txt", GOOD + BAD)
    assert cli.main(["check", lst, "--root", str(src), "--workers", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    bad = {line.split()[1].rstrip(":"): line for line in out if line.startswith("BAD ")}
    assert set(bad) == {str(src / n) for n in BAD}
    assert bad[str(src / "missing.mp4")].endswith("file not found")
    assert bad[str(src / "empty.mp4")].endswith("empty file")
    notes = [line for line in out if line.startswith("NOTE ")]
    vfr = "variable frame rate (frame intervals 40.0 to 220.0 ms)"
    assert any(str(src / "vfr.mp4") in n and vfr in n for n in notes)
    assert any(str(src / "offset.mkv") in n and "first frame at 2.000 s" in n for n in notes)
    assert len(notes) == 2
    assert out[-1] == f"{lst}: checked 12 videos (13 list lines): 7 readable, 5 bad (1 missing), 2 with notes"
    # --strict: any bad video is exit status 1; --min-frames makes the 3-frame clip bad too.
    assert cli.main(["check", lst, "--root", str(src), "--workers", "1", "--strict", "--min-frames", "4"]) == 1
    out = capsys.readouterr().out
    assert f"BAD  {src / 'three.mp4'}: too short: 3 frames, fewer than --min-frames 4" in out
    good_only = _release_list(tmp_path / "good.txt", GOOD)
    assert cli.main(["check", good_only, "--root", str(src), "--strict", "--workers", "1"]) == 0
    bad_list = tmp_path / "broken.txt"
    bad_list.write_text("k710 a.mp4 -1 -1 -1\n")
    assert cli.main(["check", str(bad_list), "--format", "release"]) == 2
    assert f"ivfast-data: {bad_list}:1: malformed line" in capsys.readouterr().err


def test_console_entry_point_and_module_run(src, tmp_path):
    assert "ivfast-data=ivfast.data.cli:main" in (ROOT / "setup.py").read_text()
    lst = tmp_path / "l.txt"
    lst.write_text("h264.mp4 0\ncorrupt.mp4 1\n")
    proc = subprocess.run([sys.executable, "-m", "ivfast.data.cli", "check", str(lst), "--root", str(src), "--strict"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"BAD  {src / 'corrupt.mp4'}" in proc.stdout and "1 readable, 1 bad" in proc.stdout


def _decode(path):
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        frames = list(c.decode(s))
        return s.codec_context.name, frames


def test_prepare_reencodes_writes_the_list_and_resumes(src, tmp_path, capsys):
    lst = _release_list(tmp_path / "anno.txt", GOOD + BAD)
    out_dir = tmp_path / "out"
    args = ["prepare", lst, str(out_dir), "--root", str(src), "--short-side", "32", "--fps", "10", "--gop", "3",
            "--workers", "2"]
    assert cli.main(args) == 0
    report = capsys.readouterr().out
    for n in BAD:
        assert f"BAD  {src / n}: " in report and "(left out)" in report
    assert "12 videos: 7 encoded, 0 already done, 5 bad" in report
    # The new list: release format, the good lines (the segment line too), paths relative to OUT_DIR.
    new = parse_list(str(out_dir / "anno.txt"), root=str(out_dir))
    old = parse_list(lst)
    kept = [ln for ln in old.lines if ln.fields[1] in GOOD]
    assert new.fmt == "release" and len(new.lines) == len(kept) == 8
    for a, b in zip(kept, new.lines):
        assert a.fields[:1] + a.fields[2:] == b.fields[:1] + b.fields[2:]  # source, times, label unchanged
        assert b.fields[1] == os.path.splitext(a.fields[1])[0] + ".mp4"
        assert os.path.isfile(b.entry.path)
    assert not list(out_dir.rglob("*.partial"))
    # Every output: H.264, 4:2:0, even size with the short side capped, 10 fps constant,
    # keyframes at most 3 apart, content following the source timestamps.
    sizes = {"h264": (42, 32), "vp9_odd": (42, 32), "mjpeg_odd": (58, 32), "three": (42, 32), "vfr": (42, 32)}
    for name, (w, h) in sizes.items():
        codec, frames = _decode(str(out_dir / f"{name}.mp4"))
        assert codec == "h264" and all(f.format.name == "yuv420p" for f in frames)
        assert (frames[0].width, frames[0].height) == (w, h)
        assert [round(f.time, 3) for f in frames] == [round(k / 10, 3) for k in range(len(frames))]
        keys = [i for i, f in enumerate(frames) if f.key_frame]
        assert keys[0] == 0 and all(b - a <= 3 for a, b in zip(keys, keys[1:] + [len(frames)]))
    _, frames = _decode(str(out_dir / "vfr.mp4"))  # slot k / 10 s shows the source frame on screen then
    shown = [max(i for i, t in enumerate(VFR_MS) if t <= 100 * k) for k in range(9)]
    assert [level_to_frame(f.to_ndarray(format="rgb24").mean()) for f in frames] == shown
    _, frames = _decode(str(out_dir / "mjpeg_odd.mp4"))  # full-range MJPEG keeps its levels
    assert [level_to_frame(f.to_ndarray(format="rgb24").mean()) for f in frames] == [0, 2]
    _, frames = _decode(str(out_dir / "offset.mp4"))
    assert frames[0].time == 0.0 and len(frames) == 5

    # Resume: everything already done is skipped; a removed output (and a stale partial) is redone.
    mtimes = {p: p.stat().st_mtime_ns for p in out_dir.rglob("*.mp4")}
    os.remove(out_dir / "vfr.mp4")
    (out_dir / "vfr.mp4.partial").write_bytes(b"half-written junk")
    assert cli.main(args) == 0
    assert "12 videos: 1 encoded, 6 already done, 5 bad" in capsys.readouterr().out
    assert not (out_dir / "vfr.mp4.partial").exists() and (out_dir / "vfr.mp4").is_file()
    for p, t in mtimes.items():
        if p.name != "vfr.mp4":
            assert p.stat().st_mtime_ns == t
    assert len(parse_list(str(out_dir / "anno.txt")).lines) == 8


def test_prepare_csv_list_and_nothing_to_prepare(src, tmp_path, capsys):
    lst = tmp_path / "l.csv"
    lst.write_text(f"path,label,note\n{src / 'three.mp4'},3,abs path\n{src / 'corrupt.mp4'},1,\n")
    out_dir = tmp_path / "o"
    assert cli.main(["prepare", str(lst), str(out_dir), "--workers", "1", "--fps", "0",
                     "--list-out", str(tmp_path / "new.csv")]) == 0
    text = (tmp_path / "new.csv").read_text().splitlines()
    rel = str(src / "three.mp4").lstrip("/")
    assert text == ["path,label,note", f"{rel},3,abs path"]
    _, frames = _decode(str(out_dir / rel))
    assert len(frames) == 3 and frames[1].time == pytest.approx(0.04)  # --fps 0 keeps the source's 25 fps
    only_bad = tmp_path / "bad.txt"
    only_bad.write_text("corrupt.mp4 0\n")
    assert cli.main(["prepare", str(only_bad), str(tmp_path / "o2"), "--root", str(src), "--workers", "1"]) == 1
    capsys.readouterr()


def test_output_names():
    names = cli.output_names(["a/x.avi", "a/x.mkv", "b/y.webm", "/abs/z.mp4", "../up.avi", "./a/w.mp4", "b/y.webm"])
    assert names == {"a/x.avi": "a/x.avi.mp4", "a/x.mkv": "a/x.mkv.mp4", "b/y.webm": "b/y.mp4",
                     "/abs/z.mp4": "abs/z.mp4", "../up.avi": "_up_/up.mp4", "./a/w.mp4": "a/w.mp4"}
    with pytest.raises(ValueError, match="same output name"):
        cli.output_names(["a.avi", "a.mkv", "a.avi.mp4"])
    assert cli.output_size(1280, 720, 320) == (568, 320)
    assert cli.output_size(63, 47, 320) == (62, 46)  # never upscaled; even
    assert cli.output_size(47, 63, 0) == (46, 62)
    assert np.all(np.array(cli.output_size(721, 1281, 320)) % 2 == 0)


def test_bench_data_quick_mode_runs(capsys):
    """benchmarks/bench_data.py in its quick mode (what a GPU run does, at tiny sizes; writes nothing)."""
    from benchmarks import bench_data

    assert bench_data.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "pyav  320p workers=2:" in out and "pyav  720p workers=2:" in out and "synthetic  320p" in out
    assert "dali: skipped" in out or " dali " in out
    assert "0 bad" in out and "results:" not in out
