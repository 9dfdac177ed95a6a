"""Webdataset-style tar shards (``data.source: shards``): names, sample grouping, the rank x
worker split, the buffer shuffle, resume to the batch, frames in a shard, bad input."""
from __future__ import annotations

import io
import logging
import os
import tarfile
import types

import numpy as np
import pytest

from ivfast.data import shards as sh
from ivfast.data.config import DataConfig
from ivfast.data.loader import build_dataset, build_loader
from tests.clips import frames_of, numbered_frames, write_numbered_clip


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory):
    path = write_numbered_clip(str(tmp_path_factory.mktemp("clip") / "c.mp4"), num_frames=8, width=32, height=32)
    with open(path, "rb") as f:
        return f.read()


def write_tar(path, members) -> str:
    """A tar of ``(name, bytes)`` members, in order."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def make_shards(d, clip, sizes) -> list[str]:
    """Shards ``s-000.tar ...`` of ``sizes[i]`` video samples; sample k of the whole set is
    ``{k:04d}.mp4`` with label k."""
    paths, k = [], 0
    for i, n in enumerate(sizes):
        members = []
        for _ in range(n):
            members += [(f"{k:04d}.mp4", clip), (f"{k:04d}.cls", str(k).encode())]
            k += 1
        paths.append(write_tar(d / f"s-{i:03d}.tar", members))
    return paths


def _dataset(paths, **kw):
    return sh.ShardDataset(paths, sh.index_shards(paths), num_frames=4, size=32, **kw)


def run_worker(ds, wid, workers, monkeypatch) -> list[dict]:
    """The batches loader worker ``wid`` of ``workers`` yields (in this process)."""
    monkeypatch.setattr(sh, "get_worker_info", lambda: types.SimpleNamespace(id=wid, num_workers=workers))
    return list(iter(ds))


def rank_batches(ds, plan, workers, monkeypatch) -> list[list[int]]:
    """A rank's batches in the DataLoader's round-robin order: worker i's t-th batch is batch
    ``start + i + t * workers``."""
    per = [run_worker(ds, w, workers, monkeypatch) for w in range(workers)]
    out = []
    for t in range(max(len(p) for p in per)):
        out += [p[t]["index"].tolist() for p in per if t < len(p)]
    return out


# ----------------------------------------------------------------------------- names, grouping

def test_brace_expansion():
    assert sh.expand_braces("train-{000000..000002}.tar") == ["train-000000.tar", "train-000001.tar",
                                                             "train-000002.tar"]
    assert sh.expand_braces("{08..10}") == ["08", "09", "10"]
    assert sh.expand_braces("{8..10}") == ["8", "9", "10"]
    assert sh.expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert sh.expand_braces("x{a,{b,c}}") == ["xa", "xb", "xc"]
    assert sh.expand_braces("{0..6..3}") == ["0", "3", "6"]
    assert sh.expand_braces("plain.tar") == ["plain.tar"]
    assert sh.expand_shards(["a-{0..1}.tar", "b.tar", "c-{x,y}.tar"]) == ["a-0.tar", "a-1.tar", "b.tar",
                                                                         "c-x.tar", "c-y.tar"]
    with pytest.raises(ValueError, match="unbalanced"):
        sh.expand_braces("a-{0..1.tar")


def test_samples_are_adjacent_members_sharing_a_key(tmp_path, clip_bytes):
    assert sh.split_member("dir/abc.0001.jpg") == ("dir/abc", "0001.jpg")
    assert sh.split_member("./abc.mp4") == ("abc", "mp4")
    assert sh.split_member("README") is None
    path = write_tar(tmp_path / "a.tar", [
        ("v/a.mp4", clip_bytes), ("v/a.cls", b"3"), ("v/a.json", b"{}"),
        ("README", b"not a sample"),
        ("f.0001.jpg", b"x"), ("f.0000.jpg", b"y"),
        ("n.txt", b"no video"),
    ])
    assert sh.count_samples(path) == 3
    got = list(sh.iter_samples(path))
    assert [(s.key, list(s.members)) for s in got] == [("v/a", ["mp4", "cls", "json"]),
                                                     ("f", ["0001.jpg", "0000.jpg"]), ("n", ["txt"])]


# ----------------------------------------------------------------------------- split, shuffle, resume

@pytest.mark.parametrize("sizes,world,workers", [([3, 5, 4, 6, 2, 4], 2, 2), ([12], 2, 3)])
def test_every_sample_once_per_epoch_across_ranks_and_workers(tmp_path, clip_bytes, monkeypatch,
                                                                sizes, world, workers):
    paths = make_shards(tmp_path, clip_bytes, sizes)
    total, b = sum(sizes), 2
    seen = []
    for rank in range(world):
        ds = _dataset(paths)
        ds.plan = plan = sh.ShardPlan(ds.counts, b, rank, world, seed=5, shuffle_buffer=4)
        plan.set_position(1, 0)
        batches = rank_batches(ds, plan, workers, monkeypatch)
        assert len(batches) == len(plan) == total // (b * world)
        assert all(len(x) == b for x in batches)
        seen += [i for x in batches for i in x]
    assert len(seen) == len(set(seen)) == (total // (b * world)) * b * world


def test_labels_frames_and_seeds_follow_the_sample(tmp_path, clip_bytes, monkeypatch):
    paths = make_shards(tmp_path, clip_bytes, [3, 3])
    ds = _dataset(paths)
    ds.plan = sh.ShardPlan(ds.counts, 3, 0, 1, seed=1, shuffle_buffer=0)
    for batch in run_worker(ds, 0, 1, monkeypatch):
        assert batch["num_bad"] == 0 and batch["video"].shape == (3, 3, 4, 32, 32)
        assert batch["label"].tolist() == batch["index"].tolist()  # .cls is k for sample k
        for v in batch["video"]:
            f = frames_of(v)
            assert f == sorted(f) and len(set(f)) == 4 and 0 <= f[0] and f[-1] < 8


def test_shuffle_is_seeded_by_epoch_and_buffer_order_is_a_permutation(tmp_path, clip_bytes, monkeypatch):
    order = sh.buffer_order(50, 8, np.random.default_rng(0))
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert order == sh.buffer_order(50, 8, np.random.default_rng(0))
    assert sh.buffer_order(5, 0, np.random.default_rng(0)) == [0, 1, 2, 3, 4]
    paths = make_shards(tmp_path, clip_bytes, [4, 4])
    ds = _dataset(paths)
    ds.plan = plan = sh.ShardPlan(ds.counts, 2, 0, 1, seed=3, shuffle_buffer=3)

    def epoch(e):
        plan.set_position(e, 0)
        return [i for batch in run_worker(ds, 0, 1, monkeypatch) for i in batch["index"].tolist()]

    e0 = epoch(0)
    assert e0 == epoch(0) and sorted(e0) == list(range(8))
    assert any(epoch(e) != e0 for e in (1, 2))


def test_resume_continues_with_the_same_batches(tmp_path, clip_bytes, monkeypatch, caplog):
    paths = make_shards(tmp_path, clip_bytes, [5, 4, 3])
    ds = _dataset(paths)
    ds.plan = plan = sh.ShardPlan(ds.counts, 2, 1, 2, seed=9, shuffle_buffer=3)  # rank 1 of 2: 3 batches
    plan.set_position(2, 0)
    full = rank_batches(ds, plan, 2, monkeypatch)
    assert len(full) == 3
    for k in range(1, 4):
        plan.set_position(2, k)
        assert rank_batches(ds, plan, 2, monkeypatch) == full[k:]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_to_the_batch(tmp_path, clip_bytes, workers):
    """build_dataset / build_loader as the trainer calls them (with real worker processes)."""
    make_shards(tmp_path, clip_bytes, [3, 3, 2, 4])
    d = DataConfig(source="shards", shards=str(tmp_path / "s-{000..003}.tar"), num_frames=4, img_size=32,
                   batch_size=2, num_workers=workers, shuffle_buffer=3,
                   shard_index=str(tmp_path / "run" / "idx.json"))
    ds = build_dataset(d)
    assert len(ds) == 12 and os.path.isfile(d.shard_index)
    loader, sampler = build_loader(d, ds, rank=0, world=1, seed=4, pin_memory=False)
    assert len(sampler) == 6
    sampler.set_position(0, 0)
    full = [b["index"].tolist() for b in loader]
    assert sorted(i for x in full for i in x) == list(range(12))
    sampler.set_position(0, 3)
    assert [b["index"].tolist() for b in loader] == full[3:]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_loader(d, ds, rank=0, world=7, seed=4, pin_memory=False)


def test_counts_are_cached_and_recounted_when_a_shard_changes(tmp_path, clip_bytes, monkeypatch):
    paths = make_shards(tmp_path, clip_bytes, [2, 3])
    cache = str(tmp_path / "idx.json")
    assert sh.index_shards(paths, cache) == [2, 3]
    calls = []
    real = sh.count_samples
    monkeypatch.setattr(sh, "count_samples", lambda p: calls.append(p) or real(p))
    assert sh.index_shards(paths, cache) == [2, 3] and calls == []
    write_tar(paths[1], [("z.mp4", clip_bytes)])
    assert sh.index_shards(paths, cache) == [2, 1] and calls == [paths[1]]


# ----------------------------------------------------------------------------- frames in a shard

def test_a_sample_of_frames(tmp_path, monkeypatch):
    from PIL import Image

    members = []
    for k, frame in enumerate(numbered_frames(6, 32, 32)):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="PNG")
        members.append((f"clip.{k:04d}.png", buf.getvalue()))
    members.append(("clip.cls", b"7"))
    path = write_tar(tmp_path / "f.tar", members[::-1])  # frames are ordered by number, not by tar order
    ds = _dataset([path])
    ds.plan = sh.ShardPlan(ds.counts, 1, 0, 1, seed=0, shuffle_buffer=0)
    (batch,) = run_worker(ds, 0, 1, monkeypatch)
    assert batch["label"].tolist() == [7]
    f = frames_of(batch["video"][0])
    assert f == sorted(f) and len(set(f)) == 4 and f[-1] <= 5


# ----------------------------------------------------------------------------- bad input

def test_bad_members_and_samples_are_skipped_named_and_counted(tmp_path, clip_bytes, monkeypatch, caplog):
    path = write_tar(tmp_path / "bad.tar", [
        ("ok.mp4", clip_bytes), ("ok.cls", b"1"),
        ("garbage.mp4", b"\x00not a video" * 50),
        ("novideo.cls", b"2"), ("novideo.json", b"{}"),
        ("badcls.mp4", clip_bytes), ("badcls.cls", b"seven"),
    ])
    ds = _dataset([path])
    ds.plan = sh.ShardPlan(ds.counts, 4, 0, 1, seed=0, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="ivfast.data"):
        (batch,) = run_worker(ds, 0, 1, monkeypatch)
    assert batch["num_bad"] == 3 and batch["index"].tolist() == [0]
    text = caplog.text
    assert f"{path}:garbage.mp4" in text
    assert f"{path}:novideo: no video member" in text
    assert "badcls.cls is not an integer" in text


def test_a_truncated_shard_loses_only_its_tail(tmp_path, clip_bytes, monkeypatch, caplog):
    good, cut = make_shards(tmp_path, clip_bytes, [2, 3])
    with open(cut, "rb") as f:
        data = f.read()
    with open(cut, "wb") as f:  # into the second sample's video (of three) of that shard
        f.write(data[: 512 * 3 + len(clip_bytes) + 1024 + 700])
    counts = sh.index_shards([good, cut])
    assert counts[0] == 2 and 1 <= counts[1] <= 3
    ds = sh.ShardDataset([good, cut], counts, num_frames=4, size=32)
    ds.plan = plan = sh.ShardPlan(counts, 1, 0, 1, seed=0, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="ivfast.data"):
        batches = run_worker(ds, 0, 1, monkeypatch)
    assert len(batches) == len(plan) == sum(counts)  # the batch count never changes
    assert sum(b["num_bad"] for b in batches) == counts[1] - 1
    assert f"broken shard {cut}:0003.mp4" in caplog.text


def test_a_shard_deleted_after_the_start_is_bad_samples_not_a_hang(tmp_path, clip_bytes, monkeypatch, caplog):
    paths = make_shards(tmp_path, clip_bytes, [2, 2])
    ds = _dataset(paths)
    ds.plan = sh.ShardPlan(ds.counts, 2, 0, 1, seed=0, shuffle_buffer=2)
    os.remove(paths[0])
    with caplog.at_level(logging.WARNING, logger="ivfast.data"):
        batches = run_worker(ds, 0, 1, monkeypatch)
    assert sum(b["num_bad"] for b in batches) == 2 and len(batches) == 2
    assert paths[0] in caplog.text


def test_a_missing_shard_is_an_error_at_start(tmp_path, clip_bytes):
    make_shards(tmp_path, clip_bytes, [2])
    d = DataConfig(source="shards", shards=str(tmp_path / "s-{000..001}.tar"), num_frames=4, img_size=32)
    with pytest.raises(FileNotFoundError, match=r"1 of 2 shards do not exist \(first: .*s-001.tar\)"):
        build_dataset(d)


def test_config_checks_the_shard_keys():
    from ivfast.config import Config, ConfigError, validate

    cfg = Config()
    cfg.data.source = "shards"
    with pytest.raises(ConfigError, match="data.shards"):
        validate(cfg)
    cfg.data.shards, cfg.data.shuffle_buffer = "a-{0..1}.tar", -1
    with pytest.raises(ConfigError, match="data.shuffle_buffer"):
        validate(cfg)
    cfg.data.shuffle_buffer, cfg.data.backend = 10, "dali"
    with pytest.raises(ConfigError, match="data.backend"):
        validate(cfg)
    cfg.data.backend = "pyav"
    validate(cfg)


def test_shards_by_fsspec_url(clip_bytes, monkeypatch):
    fsspec = pytest.importorskip("fsspec")
    mem = fsspec.filesystem("memory")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in [("a.mp4", clip_bytes), ("a.cls", b"4"), ("b.mp4", clip_bytes)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    mem.pipe("/ivfast-shards/m-0.tar", buf.getvalue())
    try:
        paths = sh.expand_shards("memory://ivfast-shards/m-{0..0}.tar")
        ds = _dataset(paths)
        assert ds.counts == [2]
        ds.plan = sh.ShardPlan(ds.counts, 2, 0, 1, seed=0, shuffle_buffer=0)
        (batch,) = run_worker(ds, 0, 1, monkeypatch)
        assert batch["num_bad"] == 0 and batch["label"].tolist() == [4, 0]
        with pytest.raises(FileNotFoundError):
            sh.index_shards(["memory://ivfast-shards/none.tar"])
    finally:
        mem.rm("/ivfast-shards", recursive=True)


def test_data_shards_takes_a_pattern_or_a_list():
    """``data.shards`` is one brace pattern or a list of paths / patterns (a YAML string or list)."""
    from ivfast.config import ConfigError, load_config

    one = load_config(None, ["data.source=shards", "data.backend=pyav", "data.shards=s-{0..1}.tar"])
    assert one.data.shards == ["s-{0..1}.tar"] and sh.expand_shards(one.data.shards) == ["s-0.tar", "s-1.tar"]
    many = load_config(None, ["data.source=shards", "data.backend=pyav", 'data.shards=["a.tar", "b-{x,y}.tar"]'])
    assert sh.expand_shards(many.data.shards) == ["a.tar", "b-x.tar", "b-y.tar"]
    with pytest.raises(ConfigError, match="data.shards"):
        load_config(None, ["data.source=shards", "data.backend=pyav"])
