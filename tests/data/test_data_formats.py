"""Data formats: the 3-field VideoMAEv2 / InternVideo lines, folders of frames, fsspec URLs for
lists and files, and bad input in each (a bad line, a missing frame, an unreadable file)."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from ivfast.data import loader as loader_mod
from ivfast.data.config import DataConfig, frame_template_error
from ivfast.data.frames import frame_name
from ivfast.data.lists import VideoEntry, check_files, detect_format, parse_list, read_list, segment_frames
from ivfast.data.sampling import tsn_indices
from ivfast.data.video_list import VideoListDataset
from tests.clips import frames_of, numbered_frames, write_numbered_clip, write_video
from tests.support import write_text


def _image_bytes(frame: np.ndarray, fmt: str) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format=fmt)
    return buf.getvalue()


def _frame_dir(path, frames: np.ndarray, start: int = 1, template: str = "img_{:05d}.jpg") -> str:
    """A folder with frame k of ``frames`` in ``frame_name(template, start + k)``."""
    pytest.importorskip("PIL")
    os.makedirs(path, exist_ok=True)
    fmt = "PNG" if template.endswith(".png") else "JPEG"
    for k, fr in enumerate(frames):
        with open(os.path.join(path, frame_name(template, start + k)), "wb") as f:
            f.write(_image_bytes(fr, fmt))
    return str(path)


# ----------------------------------------------------------------------------- the 3-field lines
def test_videomae_lines(tmp_path):
    f = write_text(tmp_path, "pretrain.txt",
               "k400/a.mp4 0 -1\n"
               "# a comment\n"
               "ssv2/12 1 40\n"
               "/abs/b.mp4 5 -1 3\n"
               "ava/c 0 12 7\n")
    assert detect_format(f) == "videomae"
    assert read_list(f, root="/data") == [
        VideoEntry("/data/k400/a.mp4"),
        VideoEntry("/data/ssv2/12", start_frame=1, frame_count=40, frames=True),
        VideoEntry("/abs/b.mp4", 3, start_frame=5),
        VideoEntry("/data/ava/c", 7, start_frame=0, frame_count=12, frames=True),
    ]
    assert [ln.lineno for ln in parse_list(f).lines] == [1, 3, 4, 5]
    # A video line's start is its first frame; -1 samples to the end.
    assert segment_frames(VideoEntry("v", start_frame=5), 12) == (5, 7)
    with pytest.raises(ValueError, match="starts at frame 12"):
        segment_frames(VideoEntry("v", start_frame=12), 12)


@pytest.mark.parametrize("line, why", [
    ("a.mp4 0\n", "expected 'path start total [label]', got 2"),
    ("a.mp4 0 -1 1 2\n", "got 5"),
    ("a.mp4 x -1\n", "start 'x' is not an integer"),
    ("a.mp4 0 1.5\n", "total '1.5' is not an integer"),
    ("a.mp4 -1 -1\n", "negative start"),
    ("dir 0 0\n", "total 0 must be >= 1"),
    ("a.mp4 0 -1 y\n", "label 'y'"),
])
def test_bad_videomae_lines_raise_or_are_kept_as_bad_samples(tmp_path, caplog, line, why):
    f = write_text(tmp_path, "l.txt", "ok.mp4 0 -1\n" + line + "ok2.mp4 0 -1\n")
    with pytest.raises(ValueError) as e:
        read_list(f, fmt="videomae")
    assert str(e.value).startswith(f"{f}:2: malformed line") and why in str(e.value)
    with caplog.at_level(logging.WARNING, logger="ivfast.data"):
        entries = read_list(f, fmt="videomae", bad_lines="keep")
    assert [e.error is None for e in entries] == [True, False, True]
    assert entries[1].error.startswith(f"{f}:2: ") and why in entries[1].error
    assert f"{f}: 1 malformed line(s) skipped" in caplog.text
    with pytest.raises(ValueError, match="bad_lines"):
        read_list(f, bad_lines="skip")


def test_bad_lines_of_the_other_formats_are_kept_too(tmp_path):
    r = write_text(tmp_path, "r.txt", "k710 a.mp4 10 -1 -1 1\nk710 b.mp4 10 -1 -1 x\n")
    p = write_text(tmp_path, "p.txt", "a.mp4 1\nb.mp4 one\n")
    c = write_text(tmp_path, "c.csv", "path,label\na.mp4,1\nb.mp4\n")
    for f, fmt in ((r, "release"), (p, "plain"), (c, "csv")):
        entries = read_list(f, bad_lines="keep")
        assert entries[0].error is None and entries[1].path == "b.mp4"
        assert entries[1].error.startswith(f"{f}:{3 if fmt == 'csv' else 2}: malformed"), fmt


# ----------------------------------------------------------------------------- folders of frames
@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    frames = numbered_frames(12, 64, 48)
    return {
        "dir": d,
        "frames": frames,
        "video": write_numbered_clip(str(d / "v.mp4"), num_frames=12),
        "jpg": _frame_dir(d / "jpg", frames, start=1),
        "png": _frame_dir(d / "png", frames, start=0, template="frame_%04d.png"),
    }


@pytest.mark.parametrize("kind, start, template", [("jpg", 1, "img_{:05d}.jpg"), ("png", 0, "frame_%04d.png")])
def test_a_frame_folder_is_sampled_like_the_video(media, kind, start, template):
    """Same frame indices for the same seed as the video (train and eval), with the
    default template (first file img_00001.jpg) and a printf-style one."""
    folder = VideoEntry(media[kind], 2, start_frame=start, frame_count=12, frames=True)
    ds = VideoListDataset([folder], num_frames=4, size=32, frame_template=template)
    vid = VideoListDataset([VideoEntry(media["video"], 2)], num_frames=4, size=32)
    for seed in range(4):
        expect = tsn_indices(12, 4, np.random.default_rng(seed)).tolist()
        item = ds[(0, seed)]
        assert item["label"] == 2 and item["video"].shape == (3, 4, 32, 32)
        assert frames_of(item["video"]) == expect == frames_of(vid[(0, seed)]["video"])
    ev = VideoListDataset([folder], num_frames=4, size=32, frame_template=template, train=False)
    assert frames_of(ev[(0, 0)]["video"]) == tsn_indices(12, 4).tolist()
    # A sub-range of the folder: frames start+3 .. start+8 are the clip's 6 frames.
    sub = VideoEntry(media[kind], start_frame=start + 3, frame_count=6, frames=True)
    ds = VideoListDataset([sub], num_frames=3, size=32, frame_template=template, train=False)
    assert frames_of(ds[(0, 0)]["video"]) == (3 + tsn_indices(6, 3)).tolist()


def test_frame_folder_crop_and_flip_match_the_video(tmp_path):
    """A textured clip: the folder's clip is the video's (same crop and flip draws)."""
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 255, (6, 24, 32, 1), dtype=np.uint8), 3, axis=-1)
    frames = np.repeat(np.repeat(frames, 2, axis=1), 2, axis=2)  # 48 x 64, smooth enough for H.264
    video = write_video(str(tmp_path / "t.mp4"), frames)
    folder = _frame_dir(tmp_path / "t", frames, template="{:03d}.png", start=0)
    a = VideoListDataset([VideoEntry(video)], num_frames=4, size=32)
    b = VideoListDataset([VideoEntry(folder, frame_count=6, frames=True)], num_frames=4, size=32,
                         frame_template="{:03d}.png")
    for seed in range(3):
        assert torch.allclose(a[(0, seed)]["video"], b[(0, seed)]["video"], atol=0.1)


def test_frame_folder_bad_input(media, tmp_path, caplog):
    """Missing, empty and undecodable frames, a folder shorter than its line, too few
    frames: None and one warning naming the frame; never retried."""
    frames = media["frames"]
    holes = _frame_dir(tmp_path / "holes", frames, start=1)
    os.remove(os.path.join(holes, "img_00006.jpg"))
    open(os.path.join(holes, "img_00007.jpg"), "wb").close()
    with open(os.path.join(holes, "img_00008.jpg"), "wb") as f:
        f.write(b"not a jpeg at all")
    cases = {
        "missing frame": VideoEntry(holes, start_frame=6, frame_count=1, frames=True),
        "empty frame file": VideoEntry(holes, start_frame=7, frame_count=1, frames=True),
        "cannot decode frame": VideoEntry(holes, start_frame=8, frame_count=1, frames=True),
        "img_00013.jpg": VideoEntry(media["jpg"], start_frame=1, frame_count=20, frames=True),
        "too short": VideoEntry(media["jpg"], start_frame=1, frame_count=3, frames=True),
        "missing frame ": VideoEntry(str(tmp_path / "no_such_dir"), start_frame=1, frame_count=4, frames=True),
    }
    for why, entry in cases.items():
        caplog.clear()
        ds = VideoListDataset([entry], num_frames=4, size=32, min_frames=4 if why == "too short" else 1,
                              train=False)
        with caplog.at_level(logging.WARNING, logger="ivfast.data"):
            assert ds[(0, 0)] is None
        msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(msgs) == 1 and msgs[0].startswith(f"cannot read video {entry.path}: ") and why.strip() in msgs[0]


def test_frame_templates():
    assert frame_name("img_{:05d}.jpg", 7) == "img_00007.jpg" and frame_name("f%03d.png", 7) == "f007.png"
    assert frame_template_error("img_{:05d}.jpg") is None and frame_template_error("%06d.jpg") is None
    for bad in ("img.jpg", "img_{:05d}/x.jpg", "img_{name}.jpg", "img_{:05d}_{:d}.jpg"):
        assert frame_template_error(bad) is not None
        with pytest.raises(ValueError, match="frame template"):
            VideoListDataset([VideoEntry("x")], frame_template=bad)


# ----------------------------------------------------------------------------- fsspec URLs
def _memory_tree(prefix: str, files: dict[str, bytes]) -> str:
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for name, data in files.items():
        with fs.open(f"{prefix}/{name}", "wb") as f:
            f.write(data)
    return f"memory://{prefix}"


def test_lists_videos_and_frames_from_memory_urls(media, tmp_path, caplog):
    pytest.importorskip("fsspec")
    with open(media["video"], "rb") as f:
        video = f.read()
    jpgs = {}
    for k in range(1, 13):
        with open(os.path.join(media["jpg"], f"img_{k:05d}.jpg"), "rb") as f:
            jpgs[f"frames/img_{k:05d}.jpg"] = f.read()
    root = _memory_tree(f"/ivfast-test-{tmp_path.name}", {"v.mp4": video, "empty.mp4": b"", **jpgs,
                        "list.txt": b"v.mp4 0 -1 1\nframes 1 12 2\nmissing.mp4 0 -1 3\nempty.mp4 0 -1 4\n"
                                    b"frames 1 x\n"})
    lst = root + "/list.txt"
    assert detect_format(lst) == "videomae"
    entries = read_list(lst, root=root, bad_lines="keep")
    assert [e.path for e in entries[:2]] == [root + "/v.mp4", root + "/frames"]
    found, missing = check_files(entries)
    assert [e.label for e in found] == [1, 2, 4] and len(missing) == 2
    ds = VideoListDataset(lst, root=root, num_frames=4, size=32)  # a list file: bad lines kept
    for seed in range(2):
        expect = tsn_indices(12, 4, np.random.default_rng(seed)).tolist()
        assert frames_of(ds[(0, seed)]["video"]) == expect == frames_of(ds[(1, seed)]["video"])
    with caplog.at_level(logging.WARNING, logger="ivfast.data"):
        assert ds[(2, 0)] is None and ds[(3, 0)] is None and ds[(4, 0)] is None
    assert "file not found" in caplog.text and "empty file" in caplog.text
    assert f"{lst}:5: malformed line 'frames 1 x'" in caplog.text


def test_a_url_video_is_read_once_per_clip(media, tmp_path, monkeypatch):
    """However many passes decoding takes (header, count, decode), the file is fetched once."""
    from ivfast.data import fs
    from ivfast.data.video_list import load_clip

    with open(media["video"], "rb") as f:
        root = _memory_tree(f"/ivfast-once-{tmp_path.name}", {"v.mp4": f.read()})
    reads = []
    real = fs.read_bytes
    monkeypatch.setattr(fs, "read_bytes", lambda path: reads.append(path) or real(path))
    frames = load_clip(root + "/v.mp4", 4, None)
    assert frames.shape[0] == 4 and reads == [root + "/v.mp4"]


def test_file_urls_and_csv_through_fsspec(media, tmp_path):
    pytest.importorskip("fsspec")
    lst = write_text(tmp_path, "l.csv", "path,label\nv.mp4,3\n")
    root = "file://" + str(media["dir"])
    entries = read_list("file://" + lst, root=root)
    assert entries == [VideoEntry(root + "/v.mp4", 3)]
    assert check_files(entries) == (entries, [])
    ds = VideoListDataset(entries, num_frames=4, size=32, train=False)
    assert frames_of(ds[(0, 0)]["video"]) == tsn_indices(12, 4).tolist()
    folder = VideoEntry("file://" + media["jpg"], start_frame=1, frame_count=12, frames=True)
    assert check_files([folder]) == ([folder], [])
    assert frames_of(VideoListDataset([folder], num_frames=4, size=32, train=False)[(0, 0)]["video"]) == \
        tsn_indices(12, 4).tolist()
    with pytest.raises(FileNotFoundError, match="list file not found"):
        read_list("file://" + str(tmp_path / "nope.txt"))


# ----------------------------------------------------------------------------- through the loader
def test_loader_skips_and_counts_bad_lines_frames_and_files(media, tmp_path):
    """A 3-field list through build_dataset / build_loader: the bad line, the folder with a
    missing frame and the unreadable file are dropped from the batch and counted."""
    holes = _frame_dir(tmp_path / "holes", media["frames"], start=1)
    for k in range(2, 13):
        os.remove(os.path.join(holes, f"img_{k:05d}.jpg"))
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 512)
    os.symlink(media["video"], tmp_path / "v.mp4")
    os.symlink(media["jpg"], tmp_path / "frames")
    lst = write_text(tmp_path, "pretrain.txt",
                 "v.mp4 0 -1\nframes 1 12\nholes 1 12\njunk.mp4 0 -1\nv.mp4 zero -1\nframes 1 12 5\n")
    d = DataConfig(source="list", list_file=lst, root=str(tmp_path), backend="pyav", batch_size=6, num_workers=0,
                   num_frames=4, img_size=32, min_frames=4)
    ds = loader_mod.build_dataset(d)
    loader, _ = loader_mod.build_loader(d, ds, rank=0, world=1, seed=0, pin_memory=False)
    (batch,) = list(loader)
    assert batch["num_bad"] == 3
    assert sorted(batch["label"].tolist()) == [0, 0, 5] and batch["video"].shape == (3, 3, 4, 32, 32)


def test_frame_folders_and_urls_go_to_the_pyav_backend(media, tmp_path, monkeypatch):
    """DALI reads local video files: with backend auto a list with a folder of frames is read
    by PyAV; an explicit dali backend is refused with one line."""
    monkeypatch.setattr(loader_mod, "_dali_usable", lambda: True)
    lst = write_text(tmp_path, "l.txt", f"{media['video']} 0 -1\n{media['jpg']} 1 12\n")
    d = DataConfig(source="list", list_file=lst, backend="auto", num_frames=4, img_size=32)
    assert loader_mod.resolve_backend(d) == "dali"
    assert isinstance(loader_mod.build_dataset(d), VideoListDataset) and d.backend == "pyav"
    d = DataConfig(source="list", list_file=lst, backend="dali", num_frames=4, img_size=32)
    with pytest.raises(ValueError, match="names a folder of frames .*set data.backend: pyav"):
        loader_mod.build_dataset(d)


def test_run_config_keys():
    from ivfast.config import ConfigError, load_config

    c = load_config("tiny", ["data.list_format=videomae", "data.frame_template=frame_%06d.png"])
    assert (c.data.list_format, c.data.frame_template) == ("videomae", "frame_%06d.png")
    with pytest.raises(ConfigError, match="data.frame_template = 'frames.jpg': must put the frame number"):
        load_config("tiny", ["data.frame_template=frames.jpg"])
