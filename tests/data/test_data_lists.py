"""Dataset lists (release, plain, CSV), segments, the file check, and the data.backend dispatch."""
from __future__ import annotations

import logging
import os
import sys
import types

import pytest
import torch

from ivfast.data import loader as loader_mod
from ivfast.data.config import DataConfig
from ivfast.data.lists import (
    VideoEntry,
    check_files,
    detect_format,
    files_summary,
    format_list,
    parse_list,
    read_list,
    segment_frames,
)
from tests.support import ROOT, write_text


# ----------------------------------------------------------------------------- formats
def test_release_format(tmp_path):
    f = write_text(tmp_path, "anno.txt",
               "# the release's annotation lines\n"
               "k710 k400/a.mp4 10.0 -1 -1 3\n"
               "\n"
               "ssv2 ssv2/12.webm 3.2 -1 -1 87\n"
               "anet /abs/v.mp4 120.5 30.0 45.5 12\n"
               "SSV2 b.webm -1 1 2 0\n")
    assert detect_format(f) == "release"
    assert read_list(f, root="/data") == [
        VideoEntry("/data/k400/a.mp4", 3, flip=True, start_s=None, end_s=None, total_s=10.0),
        VideoEntry("/data/ssv2/12.webm", 87, flip=False, total_s=3.2),
        VideoEntry("/abs/v.mp4", 12, flip=True, start_s=30.0, end_s=45.5, total_s=120.5),
        VideoEntry("/data/b.webm", 0, flip=False, start_s=1.0, end_s=2.0, total_s=None),
    ]
    lst = parse_list(f)
    assert lst.fmt == "release" and [ln.lineno for ln in lst.lines] == [2, 4, 5, 6]
    assert lst.lines[0].entry.path == "k400/a.mp4"


@pytest.mark.parametrize("line, why", [
    ("k710 a.mp4 10 -1 -1\n", "6"),              # 5 fields (an explicit release list)
    ("k710 a.mp4 ten -1 -1 0\n", "total_time"),
    ("k710 a.mp4 10 -1 -1 x\n", "label"),
    ("k710 a.mp4 10 -1 -1 -2\n", "negative label"),
    ("k710 a.mp4 10 5 4 0\n", "not after start"),
    ("k710 a.mp4 10 -3 4 0\n", "start"),
    ("k710 a.mp4 0 1 2 0\n", "total_time"),
    ("k710 a.mp4 10 nan 4 0\n", "start"),
])
def test_release_format_errors_name_file_and_line(tmp_path, line, why):
    f = write_text(tmp_path, "anno.txt", "k710 ok.mp4 10 -1 -1 1\n# c\n" + line)
    with pytest.raises(ValueError) as e:
        read_list(f, fmt="release")
    msg = str(e.value)
    assert msg.startswith(f"{f}:3: ") and why in msg and "\n" not in msg


def test_plain_format(tmp_path):
    f = write_text(tmp_path, "l.txt", "a.mp4 3\nb.mkv\n")
    assert detect_format(f) == "plain"
    assert read_list(f, "/r") == [VideoEntry("/r/a.mp4", 3), VideoEntry("/r/b.mkv", 0)]
    g = write_text(tmp_path, "bad.txt", "a.mp4 3 4\n")
    with pytest.raises(ValueError, match=f"{g}:1: .*expected 'path \\[label\\]'"):
        read_list(g, fmt="plain")


def test_csv_format(tmp_path):
    f = write_text(tmp_path, "l.csv",
               'Path,LABEL,youtube_id,source,flip,start,end,total_time\n'
               'a.mp4,3,xyz,k400,,,,\n'
               '"dir with space/b,c.mp4",1,,ssv2,true,,,\n'
               '\n'
               'c.mp4,,,,0,1.5,2.5,-1\n')
    assert detect_format(f) == "csv"
    assert read_list(f, "/r") == [
        VideoEntry("/r/a.mp4", 3, flip=True),
        VideoEntry("/r/dir with space/b,c.mp4", 1, flip=False),  # ssv2 wins over flip=true
        VideoEntry("/r/c.mp4", 0, flip=False, start_s=1.5, end_s=2.5),
    ]
    minimal = write_text(tmp_path, "m.txt", "path,label\nx.mp4,2\n")  # detected from the header
    assert detect_format(minimal) == "csv" and read_list(minimal) == [VideoEntry("x.mp4", 2)]


@pytest.mark.parametrize("text, where, why", [
    ("file,label\na.mp4,1\n", 1, "no 'path' column"),
    ("path,label,path\na.mp4,1,b\n", 1, "repeats"),
    ("path,label\na.mp4,1\nb.mp4\n", 3, "1 cells"),
    ("path,label\na.mp4,1\nb.mp4,one\n", 3, "label"),
    ("path,flip\na.mp4,maybe\n", 2, "flip"),
    ("path,label\n,1\n", 2, "empty path"),
])
def test_csv_errors_name_file_and_line(tmp_path, text, where, why):
    f = write_text(tmp_path, "l.csv", text)
    with pytest.raises(ValueError) as e:
        read_list(f)
    assert str(e.value).startswith(f"{f}:{where}: ") and why in str(e.value)


def test_format_detection_errors_and_bad_format(tmp_path):
    f = write_text(tmp_path, "l.txt", "# x\na b c d\n")
    with pytest.raises(ValueError, match=f"{f}:2: .*4 fields.*data.list_format"):
        read_list(f)
    with pytest.raises(ValueError, match="unknown list format 'tsv'"):
        read_list(f, fmt="tsv")
    with pytest.raises(FileNotFoundError, match="list file not found"):
        read_list(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("name, text", [
    ("r.txt", "k710 a.mp4 10 -1 -1 3\nssv2 b.webm 2 0.5 1.5 1\n"),
    ("p.txt", "a.mp4 3\nb.webm\n"),
    ("c.csv", "path,label,source,note\na.mp4,3,k400,x y\nb.webm,1,ssv2,\n"),
])
def test_format_list_writes_the_same_format_with_new_paths(tmp_path, name, text):
    src = parse_list(write_text(tmp_path, name, text))
    out = format_list(src, [ln.with_path(f"new/{i}.mp4") for i, ln in enumerate(src.lines)])
    again = parse_list(write_text(tmp_path, "again_" + name, out), fmt=src.fmt)
    assert again.fmt == src.fmt
    assert [e.path for e in again.entries] == ["new/0.mp4", "new/1.mp4"]
    assert [(e.label, e.flip, e.start_s, e.end_s, e.total_s) for e in again.entries] == \
           [(e.label, e.flip, e.start_s, e.end_s, e.total_s) for e in src.entries]


# ----------------------------------------------------------------------------- segments
def test_segment_frames_follows_the_release_rule():
    e = VideoEntry("v", start_s=None, end_s=None)
    assert segment_frames(e, 250) == (0, 250)
    # 300 frames over total_time 10 s: fps 30; [2.5, 5.0) s -> frames 75 .. 149.
    assert segment_frames(VideoEntry("v", start_s=2.5, end_s=5.0, total_s=10.0), 300) == (75, 75)
    # The list's total_time wins over the file's length; without it the file's length is used.
    assert segment_frames(VideoEntry("v", start_s=2.5, end_s=5.0, total_s=10.0), 300, duration_s=20.0) == (75, 75)
    assert segment_frames(VideoEntry("v", start_s=2.5, end_s=5.0), 300, duration_s=20.0) == (37, 37)
    # A missing start is 0, a missing end the end; a segment past the end is clipped.
    assert segment_frames(VideoEntry("v", end_s=1.0, total_s=10.0), 100) == (0, 10)
    assert segment_frames(VideoEntry("v", start_s=9.0, total_s=10.0), 100) == (90, 10)
    assert segment_frames(VideoEntry("v", start_s=8.0, end_s=30.0, total_s=10.0), 100) == (80, 20)
    with pytest.raises(ValueError, match="holds no frame"):
        segment_frames(VideoEntry("v", start_s=12.0, end_s=13.0, total_s=10.0), 100)
    with pytest.raises(ValueError, match="length"):
        segment_frames(VideoEntry("v", start_s=1.0, end_s=2.0), 100, duration_s=None)


# ----------------------------------------------------------------------------- file check
def test_check_files_and_summary(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "c.mp4").write_bytes(b"")
    (tmp_path / "dir.mp4").mkdir()  # a directory is not a video file
    entries = [VideoEntry(str(tmp_path / n)) for n in ("a.mp4", "b.mp4", "c.mp4", "dir.mp4")]
    found, missing = check_files(entries, workers=3)
    assert [os.path.basename(e.path) for e in found] == ["a.mp4", "c.mp4"]
    assert [os.path.basename(e.path) for e in missing] == ["b.mp4", "dir.mp4"]
    line = files_summary("train.txt", found, missing)
    assert line.startswith("train.txt: 4 videos listed, 2 found, 2 missing (first missing: ")
    assert "b.mp4" in line and "\n" not in line
    assert files_summary("t", found, []) == "t: 2 videos listed, 2 found, 0 missing"
    assert check_files([]) == ([], [])


# ----------------------------------------------------------------------------- config and backend
@pytest.mark.parametrize("overrides, msg", [
    (["data.backend=pyav"], "config error: data.backend = 'pyav': reads a data list: needs data.source 'list' "
                            "(data.source is 'synthetic')"),
    (["data.backend=dali"], "config error: data.backend = 'dali': reads a data list"),
    (["data.source=list", "data.list_file=x.txt", "data.backend=synthetic"],
     "config error: data.backend = 'synthetic': generates clips: needs data.source 'synthetic'"),
    (["data.backend=ffmpeg"], "config error: data.backend = 'ffmpeg': must be one of"),
    (["data.list_format=tsv"], "config error: data.list_format = 'tsv': must be one of"),
    (["data.min_frames=0"], "config error: data.min_frames = 0: must be >= 1"),
    (["data.decode_timeout_s=-1"], "config error: data.decode_timeout_s = -1.0: must be >= 0"),
    (["data.dali_threads=0"], "config error: data.dali_threads = 0: must be >= 1"),
    (["data.dali_prefetch=0"], "config error: data.dali_prefetch = 0: must be >= 1"),
])
def test_data_config_errors_are_one_line(overrides, msg):
    """The run config's checks of the ``data:`` keys (in ivfast/config.py)."""
    from ivfast.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), overrides)
    assert str(e.value).startswith(msg) and "\n" not in str(e.value)


def test_resolve_backend(monkeypatch):
    assert DataConfig().backend == "auto" and loader_mod.resolve_backend(DataConfig()) == "synthetic"
    lst = DataConfig(source="list", list_file="x.txt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loader_mod.resolve_backend(lst) == "pyav"  # no GPU: never DALI
    monkeypatch.setattr(loader_mod, "_dali_usable", lambda: True)
    assert loader_mod.resolve_backend(lst) == "dali"
    assert loader_mod.resolve_backend(DataConfig(source="list", list_file="x.txt", backend="pyav")) == "pyav"


def _list_data(tmp_path, names, **kw) -> DataConfig:
    lst = write_text(tmp_path, "train.txt", "".join(f"{n} {i}\n" for i, n in enumerate(names)))
    return DataConfig(**{"source": "list", "list_file": lst, "root": str(tmp_path), "batch_size": 2, **kw})


def test_build_dataset_logs_the_file_check(tmp_path, caplog):
    for n in ("a.mp4", "b.mp4"):
        (tmp_path / n).write_bytes(b"x")
    d = _list_data(tmp_path, ["a.mp4", "gone.mp4", "b.mp4"], backend="pyav")
    with caplog.at_level(logging.INFO, logger="ivfast.data"):
        ds = loader_mod.build_dataset(d)
    lines = [r.getMessage() for r in caplog.records if "videos listed" in r.getMessage()]
    assert len(lines) == 1 and "3 videos listed, 2 found, 1 missing" in lines[0] and "gone.mp4" in lines[0]
    assert len(ds) == 3  # a missing file stays: it is a bad sample, counted when met
    assert [e.path for e in ds.entries] == [str(tmp_path / n) for n in ("a.mp4", "gone.mp4", "b.mp4")]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ivfast.data"):
        loader_mod.build_dataset(_list_data(tmp_path, ["a.mp4"], check_files=False))
    assert not [r for r in caplog.records if "videos listed" in r.getMessage()]
    with pytest.raises(FileNotFoundError, match="none of the 2 videos.*check data.root"):
        loader_mod.build_dataset(_list_data(tmp_path, ["x.mp4", "y.mp4"]))
    write_text(tmp_path, "empty.txt", "# nothing\n")
    with pytest.raises(ValueError, match="names no videos"):
        loader_mod.build_dataset(DataConfig(source="list", list_file=str(tmp_path / "empty.txt")))


def test_build_loader_pyav_dataloader(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    d = _list_data(tmp_path, ["a.mp4"] * 4, num_workers=2, decode_timeout_s=5.0, min_frames=3)
    ds = loader_mod.build_dataset(d)
    assert (ds.decode_timeout_s, ds.min_frames) == (5.0, 3)
    loader, sampler = loader_mod.build_loader(d, ds, rank=0, world=1, seed=7, pin_memory=True)
    assert isinstance(loader, torch.utils.data.DataLoader) and loader.batch_sampler is sampler
    assert loader.num_workers == 2 and loader.persistent_workers and loader.pin_memory and loader.prefetch_factor == 4
    assert (sampler.seed, sampler.batch_size, sampler.world) == (7, 2, 1)


@pytest.mark.parametrize("flip", [True, False])
def test_build_loader_dali_dispatch(tmp_path, monkeypatch, flip):
    """The DALI backend gets the list's entries (flip off for all when data.flip is off) and the sampler."""
    calls = []

    class FakeDali:
        def __init__(self, entries, sampler, **kw):
            calls.append((entries, sampler, kw))

    monkeypatch.setitem(sys.modules, "ivfast.data.dali_loader", types.SimpleNamespace(DaliVideoLoader=FakeDali))
    monkeypatch.setattr(loader_mod, "_dali_usable", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    write_text(tmp_path, "anno.txt", "k710 a.mp4 10 -1 -1 1\nssv2 b.mp4 4 1 2 2\nk710 c.mp4 5 -1 -1 0\n")
    for n in ("a.mp4", "b.mp4", "c.mp4"):
        (tmp_path / n).write_bytes(b"x")
    d = DataConfig(source="list", list_file=str(tmp_path / "anno.txt"), root=str(tmp_path), batch_size=1,
                   num_frames=4, img_size=56, flip=flip, dali_threads=6, dali_prefetch=3, min_frames=5)
    ds = loader_mod.build_dataset(d)
    loader, sampler = loader_mod.build_loader(d, ds, rank=0, world=2, seed=0, pin_memory=True)
    assert isinstance(loader, FakeDali) and len(calls) == 1
    entries, s, kw = calls[0]
    assert s is sampler and (sampler.world, sampler.batch_size) == (2, 1)
    assert [e.path for e in entries] == [str(tmp_path / n) for n in ("a.mp4", "b.mp4", "c.mp4")]
    assert [e.flip for e in entries] == ([True, False, True] if flip else [False, False, False])
    assert (entries[1].start_s, entries[1].end_s, entries[1].total_s, entries[1].label) == (1.0, 2.0, 4.0, 2)
    assert kw["num_frames"] == 4 and kw["size"] == 56
    assert kw["scales"] == tuple(d.scales) and kw["device"] == "gpu" and kw["device_id"] == 3
    assert (kw["num_threads"], kw["prefetch"], kw["dtype"], kw["min_frames"]) == (6, 3, torch.float32, 5)
    assert len(kw["mean"]) == 3 and len(kw["std"]) == 3
