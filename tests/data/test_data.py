"""Data pipeline: TSN sampling, transforms, generated clips, list-file videos, collation."""
from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch

from ivfast.data import video_list as vl
from ivfast.data.collate import collate_skip_bad, sample_key
from ivfast.data.lists import read_list
from ivfast.data.sampling import tsn_indices
from ivfast.data.synthetic import SyntheticClips
from ivfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, multiscale_crop_params, train_transform
from ivfast.data.video_list import VideoListDataset, load_clip
from tests.clips import frame_levels, MEAN, STD, level_to_frame, write_corrupt, write_empty, write_numbered_clip, write_truncated


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("n,s", [(16, 16), (17, 16), (31, 16), (100, 16), (300, 8), (7, 1), (1, 1), (50, 7)])
def test_tsn_train_one_per_segment(n, s):
    for seed in range(20):
        idx = tsn_indices(n, s, np.random.default_rng(seed))
        assert idx.shape == (s,) and idx.dtype == np.int64
        assert idx.min() >= 0 and idx.max() < n
        assert np.all(np.diff(idx) > 0)
        k = np.arange(s)
        assert np.all(idx >= (k * n) // s) and np.all(idx < ((k + 1) * n) // s)
        assert np.array_equal(idx, tsn_indices(n, s, np.random.default_rng(seed)))


def test_tsn_train_is_random_and_covers_segment():
    draws = np.stack([tsn_indices(160, 16, np.random.default_rng(s)) for s in range(200)])
    assert len({tuple(d) for d in draws}) > 150
    # Every frame of segment 3 ([30, 40)) gets drawn.
    assert set(draws[:, 3].tolist()) == set(range(30, 40))


def test_tsn_eval_middles():
    assert tsn_indices(16, 16).tolist() == list(range(16))
    assert tsn_indices(32, 16).tolist() == [2 * k + 1 for k in range(16)]
    assert tsn_indices(160, 16).tolist() == [10 * k + 5 for k in range(16)]
    for n, s in [(17, 16), (50, 7), (301, 16)]:
        idx = tsn_indices(n, s)
        k = np.arange(s)
        assert np.all(idx >= (k * n) // s) and np.all(idx < ((k + 1) * n) // s)
        assert np.array_equal(idx, tsn_indices(n, s))


@pytest.mark.parametrize("n,s", [(1, 16), (5, 16), (12, 16), (15, 16), (3, 4)])
def test_tsn_short_video_repeats(n, s):
    idx = tsn_indices(n, s)
    assert idx.shape == (s,) and idx.dtype == np.int64
    assert np.all(np.diff(idx) >= 0)
    assert set(idx.tolist()) == set(range(n))
    counts = np.bincount(idx, minlength=n)
    assert counts.max() - counts.min() <= 1
    assert np.array_equal(idx, tsn_indices(n, s, np.random.default_rng(0)))


def test_tsn_errors():
    for n in (0, -3):
        with pytest.raises(ValueError):
            tsn_indices(n, 16)
    with pytest.raises(ValueError):
        tsn_indices(10, 0)


# ----------------------------------------------------------------------------- transforms
def _allowed_sizes(base, out, scales=(1, 0.875, 0.75, 0.66)):
    sizes = [int(base * s) for s in scales]
    return [out if abs(x - out) < 3 else x for x in sizes]


@pytest.mark.parametrize("h,w,out", [(256, 340, 224), (240, 320, 224), (255, 255, 224), (48, 64, 32), (100, 60, 224)])
def test_multiscale_crop_params(h, w, out):
    sizes = _allowed_sizes(min(h, w), out)
    seen = set()
    for seed in range(300):
        y0, x0, ch, cw = multiscale_crop_params(h, w, out, rng=np.random.default_rng(seed))
        assert 0 <= y0 and y0 + ch <= h and 0 <= x0 and x0 + cw <= w
        i = [j for j, s in enumerate(sizes) if min(s, h) == ch]
        j = [j for j, s in enumerate(sizes) if min(s, w) == cw]
        assert i and j, (ch, cw, sizes)
        assert min(abs(a - b) for a in i for b in j) <= 1
        seen.add((ch, cw))
    if min(h, w) >= out:
        assert len(seen) == 10  # 4 + 3 + 3 pairs with |i - j| <= 1
    if (h, w) == (255, 255):  # 255 * 0.875 = 223.1 -> 223, snapped to 224
        assert 224 in {c for pair in seen for c in pair}


def test_train_transform_shape_and_constant_frame():
    v = 137
    frames = np.full((5, 60, 80, 3), v, dtype=np.uint8)
    out = train_transform(frames, 32, np.random.default_rng(0))
    assert out.shape == (3, 5, 32, 32) and out.dtype == torch.float32
    expected = (torch.tensor(float(v), dtype=torch.float32) / 255 - MEAN) / STD  # (3, 1, 1, 1)
    assert torch.equal(out, expected.expand_as(out))


def test_train_transform_flip_mirrors_and_is_deterministic():
    rng0 = np.random.default_rng(1)
    frames = rng0.integers(0, 256, size=(4, 48, 64, 3), dtype=np.uint8)
    outcomes = set()
    for seed in range(20):
        a = train_transform(frames, 40, np.random.default_rng(seed), flip=False)
        b = train_transform(frames, 40, np.random.default_rng(seed), flip=True)
        b2 = train_transform(torch.from_numpy(frames), 40, np.random.default_rng(seed), flip=True)
        assert torch.equal(b, b2)  # deterministic, numpy or torch input
        if torch.equal(a, b):
            outcomes.add("same")
        else:
            assert torch.equal(b, a.flip(-1))
            assert not torch.equal(b, b.flip(-1))
            outcomes.add("mirrored")
    assert outcomes == {"same", "mirrored"}


def test_train_transform_crop_content():
    # A horizontal ramp stays monotonic (increasing or, when flipped, decreasing).
    ramp = np.tile(np.linspace(0, 255, 96).astype(np.uint8)[None, None, :, None], (2, 72, 1, 3))
    for seed in range(10):
        out = train_transform(ramp, 48, np.random.default_rng(seed))
        row = out[0, 0, 10]
        d = torch.diff(row)
        assert bool((d >= 0).all()) or bool((d <= 0).all())


def test_eval_transform():
    frames = np.zeros((3, 48, 96, 3), dtype=np.uint8)
    frames[:, :, 24:72] = 200  # the central square is bright, the sides black
    out = eval_transform(frames, 32, IMAGENET_MEAN, IMAGENET_STD)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    expected = (torch.tensor(200.0) / 255 - MEAN) / STD
    assert torch.equal(out, expected.expand_as(out))
    tall = eval_transform(np.full((2, 90, 30, 3), 50, np.uint8), 24, IMAGENET_MEAN, IMAGENET_STD)
    assert tall.shape == (3, 2, 24, 24)


# ----------------------------------------------------------------------------- synthetic clips
def test_synthetic_shape_determinism_and_labels():
    ds = SyntheticClips(num_clips=32, num_frames=4, size=56, num_classes=8)
    assert len(ds) == 32
    item = ds[(3, 7)]
    assert set(item) == {"video", "label", "index"}
    v = item["video"]
    assert v.shape == (3, 4, 56, 56) and v.dtype == torch.float32 and torch.isfinite(v).all()
    assert item["index"] == 3 and item["label"] == 3 % 8
    assert torch.equal(v, ds[(3, 7)]["video"])
    assert not torch.equal(ds[(3, 7)]["video"], ds[(4, 7)]["video"])
    # A fresh instance gives the same clip (nothing depends on process state).
    assert torch.equal(v, SyntheticClips(num_clips=32, num_frames=4, size=56, num_classes=8)[(3, 7)]["video"])
    labels = [ds[(i, 0)]["label"] for i in range(32)]
    assert sorted(set(labels)) == list(range(8))
    with pytest.raises(IndexError):
        ds[(32, 0)]


def test_synthetic_content_independent_of_seed_except_flip():
    ds = SyntheticClips(num_clips=8, num_frames=4, size=56)
    base = ds.render(5)
    kinds = set()
    for seed in range(16):
        v = ds[(5, seed)]["video"]
        if torch.equal(v, base):
            kinds.add("plain")
        else:
            assert torch.equal(v, base.flip(-1))
            kinds.add("flipped")
    assert kinds == {"plain", "flipped"}
    no_flip = SyntheticClips(num_clips=8, num_frames=4, size=56, flip=False)
    assert all(torch.equal(no_flip[(5, s)]["video"], base) for s in range(8))


def test_synthetic_temporal_coherence():
    ds = SyntheticClips(num_clips=16, num_frames=8, size=64)
    for i in range(16):
        v = ds.render(i)
        for t in range(7):
            a, b = v[:, t].flatten(), v[:, t + 1].flatten()
            assert not torch.equal(a, b)
            corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
            assert corr > 0.5, (i, t, float(corr))


def test_synthetic_attributes_follow_label():
    ds = SyntheticClips(num_clips=48, num_frames=2, size=32, num_classes=24)
    combos = {tuple(ds.attributes(i)[k] for k in ("shape", "axis", "speed", "texture")) for i in range(24)}
    assert len(combos) == 24
    with pytest.raises(ValueError):
        SyntheticClips(num_classes=25)


def test_synthetic_speed(capsys):
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for t, s in [(16, 224), (4, 56)]:
            ds = SyntheticClips(num_clips=20, num_frames=t, size=s)
            ds[(0, 0)]
            start = time.perf_counter()
            for i in range(10):
                ds[(i, i)]
            ms = (time.perf_counter() - start) / 10 * 1000
            with capsys.disabled():
                print(f"\nSyntheticClips {t}x{s}x{s}: {ms:.1f} ms per clip (1 thread)")
    finally:
        torch.set_num_threads(torch_threads)


# ----------------------------------------------------------------------------- list-file videos
@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    good = write_numbered_clip(str(d / "good.mp4"), num_frames=12)
    paths = {
        "good": good,
        "mkv": write_numbered_clip(str(d / "good.mkv"), num_frames=12),  # no frame count in the header
        "avi": write_numbered_clip(str(d / "good.avi"), num_frames=12),
        "short": write_numbered_clip(str(d / "short.mp4"), num_frames=3),
        "corrupt": write_corrupt(str(d / "corrupt.mp4")),
        "truncated": write_truncated(good, str(d / "truncated.mp4"), 0.3),
        "empty": write_empty(str(d / "empty.mp4")),
        "missing": str(d / "missing.mp4"),
    }
    return d, paths


def _dataset(tmp_path, paths, **kw):
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{p} {i}\n" for i, p in enumerate(paths)))
    return VideoListDataset(str(lst), **kw)


def test_video_good_clip(videos, tmp_path):
    _, p = videos
    ds = _dataset(tmp_path, [p["good"]], num_frames=4, size=32)
    item = ds[(0, 123)]
    assert item["video"].shape == (3, 4, 32, 32) and item["video"].dtype == torch.float32
    assert item["label"] == 0 and item["index"] == 0
    assert torch.equal(item["video"], ds[(0, 123)]["video"])


@pytest.mark.parametrize("kind", ["good", "mkv", "avi"])
def test_video_samples_the_right_frames(videos, tmp_path, kind):
    _, p = videos
    ds = _dataset(tmp_path, [p[kind]], num_frames=4, size=32)
    for seed in range(6):
        expected = tsn_indices(12, 4, np.random.default_rng(seed))
        got = [level_to_frame(x) for x in frame_levels(ds[(0, seed)]["video"])]
        assert got == expected.tolist(), (kind, seed)
    ev = _dataset(tmp_path, [p[kind]], num_frames=4, size=32, train=False)
    got = [level_to_frame(x) for x in frame_levels(ev[(0, 5)]["video"])]
    assert got == tsn_indices(12, 4).tolist()


def test_video_short_clip_repeats_frames(videos, tmp_path):
    _, p = videos
    ds = _dataset(tmp_path, [p["short"]], num_frames=8, size=32)
    got = [level_to_frame(x) for x in frame_levels(ds[(0, 1)]["video"])]
    assert got == tsn_indices(3, 8).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "empty", "missing"])
def test_video_bad_files_return_none_and_warn(videos, tmp_path, caplog, kind):
    _, p = videos
    ds = _dataset(tmp_path, [p["good"], p[kind]], num_frames=4, size=32)
    with caplog.at_level(logging.WARNING, logger="ivfast.data"):
        assert ds[(1, 0)] is None
    records = [r for r in caplog.records if r.name == "ivfast.data" and r.levelno == logging.WARNING]
    assert len(records) == 1
    assert p[kind] in records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ivfast.data"):
        assert ds[(0, 0)] is not None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_video_header_overstates_frame_count(videos, monkeypatch):
    """A header that claims more frames than decode: sample again on the true count."""
    _, p = videos
    real_open = vl.open_video

    class _Stream:
        def __init__(self, stream):
            self._s, self.frames = stream, 40

    class _Proxy:
        def __init__(self, c):
            self._c = c
            self.streams = type("S", (), {"video": [_Stream(c.streams.video[0])]})()

        def decode(self, stream):
            return self._c.decode(stream._s)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self._c.close()

    monkeypatch.setattr(vl, "open_video", lambda path, *a, **k: _Proxy(real_open(path, *a, **k)))
    frames = load_clip(p["good"], 4, np.random.default_rng(3), seed=3)
    assert frames.shape == (4, 48, 64, 3)
    got = [level_to_frame(f.mean()) for f in frames]
    assert got == tsn_indices(12, 4, np.random.default_rng(3)).tolist()


def test_video_dataset_in_dataloader_workers(videos, tmp_path):
    _, p = videos
    ds = _dataset(tmp_path, [p["good"], p["corrupt"], p["mkv"], p["missing"]], num_frames=4, size=32)
    batches = [[(0, 1), (1, 2), (2, 3), (3, 4)]]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=2, collate_fn=collate_skip_bad)
    (batch,) = list(loader)
    assert batch["num_bad"] == 2
    assert batch["video"].shape == (2, 3, 4, 32, 32)
    assert batch["index"].tolist() == [0, 2] and batch["label"].tolist() == [0, 2]


def _plain_pairs(path: str, root: str = "") -> list[tuple[str, int]]:
    return [(e.path, e.label) for e in read_list(path, root, fmt="plain")]


def test_plain_video_list(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("# header\n\nclips/a.mp4 3\n  b.mkv\n/abs/c.avi 0\n\t# indented comment\nd.mp4\t7\n")
    assert _plain_pairs(str(f), root="/data") == [
        ("/data/clips/a.mp4", 3),
        ("/data/b.mkv", 0),
        ("/abs/c.avi", 0),
        ("/data/d.mp4", 7),
    ]
    assert _plain_pairs(str(f))[0] == ("clips/a.mp4", 3)
    for bad in ["a.mp4 1 2\n", "a.mp4 x\n", "a.mp4 -1\n", "a.mp4 1.5\n"]:
        g = tmp_path / "bad.txt"
        g.write_text("ok.mp4 1\n# c\n" + bad)
        with pytest.raises(ValueError) as e:
            _plain_pairs(str(g))
        assert f"{g}:3" in str(e.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert _plain_pairs(str(empty)) == []
    with pytest.raises(ValueError):
        VideoListDataset(str(empty))


# ----------------------------------------------------------------------------- keys, collate
def test_sample_key():
    assert sample_key((3, 7)) == (3, 7) and sample_key([3, 7]) == (3, 7) and sample_key(5) == (5, 0)
    with pytest.raises(TypeError, match=r"must be \(index, seed\)"):
        sample_key((1, 2, 3))


def test_collate_skip_bad():
    def item(i):
        return {"video": torch.full((3, 2, 4, 4), float(i)), "label": i % 3, "index": i}

    out = collate_skip_bad([item(0), None, item(5), None, item(7)])
    assert out["num_bad"] == 2
    assert out["video"].shape == (3, 3, 2, 4, 4)
    assert out["video"][:, 0, 0, 0, 0].tolist() == [0.0, 5.0, 7.0]
    assert out["label"].dtype == torch.int64 and out["label"].tolist() == [0, 2, 1]
    assert out["index"].dtype == torch.int64 and out["index"].tolist() == [0, 5, 7]
    none = collate_skip_bad([None, None])
    assert none["video"] is None and none["num_bad"] == 2
    assert none["label"].shape == (0,) and none["index"].shape == (0,)
    good = collate_skip_bad([item(1)])
    assert good["num_bad"] == 0 and good["video"].shape == (1, 3, 2, 4, 4)
