"""Clips from webdataset-style tar shards (``data.source: shards``), read in streaming mode.

**Shards.** ``data.shards`` is a brace pattern (``train-{000000..000099}.tar``: ranges keep
zero padding, ``{a,b}`` lists, several groups; :func:`expand_braces`) and a list of them (``data.shards``)
a list of paths (each brace-expanded too). A path with a scheme (``s3://``, ``memory://``)
is read through fsspec (:mod:`ivfast.data.fs`); a missing shard is an error at start.

**Samples.** A tar member ``dir/abc.ext1.ext2`` has the key ``dir/abc`` (the path up to the
first dot of the basename) and the extension ``ext1.ext2``. Consecutive members with the
same key form one sample (members of a sample must be adjacent, as webdataset writers and
``tar --sort=name`` store them); members with no extension, and non-files, are ignored.
A sample's clip is its video member (the first whose last extension is one of
:data:`VIDEO_EXTS`, decoded by PyAV from the bytes in memory), else its frames
``key.<number>.<jpg|jpeg|png|webp|bmp>`` (ordered by number, e.g. ``abc.0000.jpg``); its
label is ``key.cls`` (a text integer; 0 when absent). Other members (``.json``, ``.txt``)
are ignored. The clip is sampled and transformed as on the list path (TSN indices, then
``train_transform``, every draw from ``default_rng(sample_seed)``).

**Epoch length.** The samples of every shard are counted once at start (tar headers
only: a seek per member for a local file, a streaming read for a URL); with
``data.shard_index`` set the counts are cached in that json file and reused while the
shard's size and modification time match. ``len(dataset)`` is the total N; an epoch has
``N // (batch_size * world)`` batches per rank (the remainder is dropped, as with lists).

**Order, split and shuffle** (:class:`ShardPlan`). Epoch e takes the shards in the
permutation seeded by (seed, e) and concatenates their samples: the epoch's global
stream. Rank r takes the contiguous part ``[r * n * B, (r + 1) * n * B)`` (n batches of B
per rank), and its W loader workers split that part into W contiguous blocks of whole
batches: worker w serves the rank's batches ``w, w + W, w + 2W, ...`` (the order in which
the DataLoader's round robin returns them). So with many shards every shard is read by
one worker (a worker reads about ``shards / (world * W)`` of them, plus at most two
shared at its block's ends), and with fewer shards than ``world x W`` the workers split
shards by contiguous sample ranges (each reads only the start of its shard to skip to
its range): in both cases every sample of the first ``n * B * world`` of the stream is
read exactly once per epoch, and every rank yields exactly n batches. Each worker
shuffles its block with a buffer of ``data.shuffle_buffer`` samples (the usual
reservoir shuffle, its draws seeded by (seed, e, rank, worker); 0 or 1: no buffer
shuffle; the buffer holds raw member bytes, so memory is about ``shuffle_buffer x``
sample size per worker). The sample seed is ``mix64(seed, e, index)`` with ``index``
the sample's place in the shard list's order (shard order as listed, then tar order).

**Resume.** The order is a function of (seed, epoch, world, batch_size, num_workers, shuffle_buffer) and the
shard counts, so ``ShardPlan.set_position(epoch, k)`` continues with rank batch k: the
workers start from the worker that owns batch k, and each drops the samples of its
batches before k *without decoding them* (the cost of a resume is reading, not
decoding, up to k x B samples of tar data per rank). Resume with the same values of
those settings to continue the same order.

**Bad input** (each named ``shard:member``, logged, counted as a bad sample in
``num_bad`` / ``bad_videos``, never retried): a member that does not decode, a sample
with no video and no frames, a bad ``.cls``; a shard that breaks mid-way (truncated tar,
read error) or was deleted after the start: one warning naming the shard and the member
where it broke, and each of its counted samples not read is a bad sample, so the number
of batches never changes.
"""
from __future__ import annotations

import json
import logging
import os
import re
import stat
import tarfile
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from ivfast.data import fs
from ivfast.data.collate import collate_skip_bad
from ivfast.data.decode_timeout import time_limit
from ivfast.data.frames import decode_image, stack_frames
from ivfast.data.sampling import clip_indices
from ivfast.data.transforms import (
    DEFAULT_SCALES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    train_transform,
)
from ivfast.data.video_list import UnreadableVideo, failure_reason, load_clip
from ivfast.rng import mix64

logger = logging.getLogger("ivfast.data")

VIDEO_EXTS = frozenset({"mp4", "m4v", "mov", "mkv", "webm", "avi", "flv", "mpg", "mpeg", "ts", "3gp", "wmv",
                        "ogv", "gif", "video"})
_FRAME = re.compile(r"^(\d+)\.(jpg|jpeg|png|webp|bmp)$", re.IGNORECASE)
_INDEX_VERSION = 1


# ----------------------------------------------------------------------------- shard names

def expand_braces(pattern: str) -> list[str]:
    """Expand a brace pattern as webdataset's ``braceexpand`` does.

    ``{a..b}`` is an integer range (inclusive, either direction, optional ``..step``),
    zero-padded to the wider bound when a bound has a leading zero (``{000..099}``);
    ``{x,y,z}`` a list; groups may nest and repeat. A pattern without braces is itself.
    """
    depth, start = 0, -1
    for i, c in enumerate(pattern):
        if c == "{":
            if depth == 0:
                start = i
            depth += 1
        elif c == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                head, body, tail = pattern[:start], pattern[start + 1:i], pattern[i + 1:]
                return [head + b + t for b in _alternatives(body) for t in expand_braces(tail)]
    if depth:
        raise ValueError(f"unbalanced braces in shard pattern {pattern!r}")
    return [pattern]


def _alternatives(body: str) -> list[str]:
    m = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?", body)
    if m:
        a, b, step = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
        if step <= 0:
            raise ValueError(f"bad step in brace range {{{body}}}")
        pad = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in m.group(1, 2))
        width = max(len(m.group(1)), len(m.group(2))) if pad else 0
        values = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
        return [str(v).zfill(width) for v in values]
    parts, depth, cur = [], 0, ""
    for c in body:  # split on top-level commas; nested groups expand below
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += (c == "{") - (c == "}")
        cur += c
    parts.append(cur)
    if len(parts) == 1:  # "{x}": not a list, the braces are literal (as braceexpand)
        return ["{" + e + "}" for e in expand_braces(body)]
    return [e for p in parts for e in expand_braces(p)]


def expand_shards(patterns: str | Sequence[str]) -> list[str]:
    """The shard paths of ``data.shards`` (one brace pattern, or a list of paths / patterns), in order."""
    out: list[str] = []
    for p in [patterns] if isinstance(patterns, str) else list(patterns):
        out += expand_braces(str(p))
    return out


# ----------------------------------------------------------------------------- reading tars

def split_member(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a tar member name, or None for a name with no extension."""
    d, base = os.path.split(name.removeprefix("./"))
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{d}/{stem}" if d else stem), ext


class BrokenShard(Exception):
    """A shard that cannot be read on; ``member``: the member where it broke (None: at its start)."""

    def __init__(self, shard: str, member: str | None, reason: str):
        where = f"{shard}:{member}" if member else shard
        super().__init__(f"{where}: {reason}")
        self.shard, self.member, self.reason = shard, member, reason


@dataclass
class RawSample:
    """The members of one sample as read: ``members`` maps extension -> bytes (tar order)."""

    shard: str
    key: str
    members: dict


def iter_samples(path: str) -> Iterator[RawSample]:
    """The samples of one shard in tar order (streaming mode); raises :class:`BrokenShard`
    where the shard cannot be read on (the samples before it have been yielded)."""
    member = None
    try:
        with fs.open_binary(path) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            cur: RawSample | None = None
            for info in tf:
                member = info.name
                parts = split_member(info.name) if info.isfile() else None
                if parts is None:
                    continue
                key, ext = parts
                if cur is not None and cur.key != key:  # complete: out before this member is read
                    yield cur
                    cur = None
                if cur is None:
                    cur = RawSample(path, key, {})
                cur.members[ext] = tf.extractfile(info).read()
            if cur is not None:
                yield cur
    except Exception as e:  # noqa: BLE001 - any read failure (tar, I/O, decompression) ends the shard
        raise BrokenShard(path, member, f"{type(e).__name__}: {e}") from None


def count_samples(path: str) -> int:
    """The number of samples of a shard (headers only where the file can seek). A shard
    that breaks counts the samples whose first header was read (one warning)."""
    n, last, member = 0, None, None
    try:
        with fs.open_binary(path) as f:
            mode = "r:*" if f.seekable() else "r|*"
            with tarfile.open(fileobj=f, mode=mode) as tf:
                for info in tf:
                    member = info.name
                    parts = split_member(info.name) if info.isfile() else None
                    if parts is not None and parts[0] != last:
                        n, last = n + 1, parts[0]
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        logger.warning("shard %s is broken after member %s (%s: %s): %d samples counted",
                       path, member, type(e).__name__, e, n)
    return n


def _stamp(path: str) -> tuple[int, float | str] | None:
    """``(size, modification stamp)`` that the cached counts of a shard are checked against;
    None when ``path`` is not a file (one stat, or one fsspec ``info`` request, per shard)."""
    if fs.is_url(path):
        fsys, p = fs.filesystem(path)
        try:
            info = fsys.info(p)
        except OSError:
            return None
        if info.get("type") != "file":
            return None
        return int(info.get("size") or 0), str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or "")
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return int(st.st_size), float(st.st_mtime)


def index_shards(paths: Sequence[str], cache: str = "") -> list[int]:
    """The sample count of each shard; ``cache``: a json file of counts reused while a shard's
    size and mtime match, rewritten when anything was counted. Missing shards: ``FileNotFoundError``."""
    stamps = [_stamp(p) for p in paths]
    missing = [p for p, s in zip(paths, stamps) if s is None]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} shards do not exist (first: {missing[0]}); "
                                f"check data.shards")
    known: dict = {}
    if cache and os.path.isfile(cache):
        try:
            with open(cache, encoding="utf-8") as f:
                blob = json.load(f)
            if blob.get("version") == _INDEX_VERSION:
                known = {e["path"]: e for e in blob.get("shards", [])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            logger.warning("shard index %s is unreadable (%s); counting again", cache, e)
    t0, counted, entries = time.perf_counter(), 0, []
    for p, (size, mtime) in zip(paths, stamps):
        e = known.get(p)
        if not (e and e.get("size") == size and e.get("mtime") == mtime and isinstance(e.get("samples"), int)):
            e = {"path": p, "size": size, "mtime": mtime, "samples": count_samples(p)}
            counted += 1
        entries.append(e)
    if counted:
        logger.info("shards: counted the samples of %d of %d shards in %.1f s%s", counted, len(paths),
                    time.perf_counter() - t0, f" (cached in {cache})" if cache else "")
        if cache:
            os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
            tmp = f"{cache}.tmp.{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"version": _INDEX_VERSION, "shards": entries}, f)
            os.replace(tmp, cache)
    return [int(e["samples"]) for e in entries]


# ----------------------------------------------------------------------------- decoding

def clip_from_images(images: Sequence[bytes], num_frames: int, rng: np.random.Generator | None, *,
                     min_frames: int = 1) -> np.ndarray:
    """TSN-sampled frames of a clip stored as one image per frame (only the picked ones are decoded)."""
    indices = clip_indices(len(images), num_frames, rng, min_frames)
    return stack_frames(indices, lambda k: decode_image(images[k]))


def sample_clip(raw: RawSample, num_frames: int, rng, seed, *, min_frames: int, timeout_s: float
                ) -> tuple[np.ndarray, int, str]:
    """``(frames, label, member named in messages)`` of one sample; raises for a bad one."""
    label, name = 0, raw.key
    if "cls" in raw.members:
        text = raw.members["cls"].decode("utf-8", "replace").strip()
        try:
            label = int(text)
        except ValueError:
            raise UnreadableVideo(f"{raw.key}.cls is not an integer: {text[:40]!r}") from None
    videos = [ext for ext in raw.members if ext.rsplit(".", 1)[-1].lower() in VIDEO_EXTS]
    if videos:
        name = f"{raw.key}.{videos[0]}"
        try:
            frames = load_clip(raw.members[videos[0]], num_frames, rng, seed, min_frames=min_frames,
                               timeout_s=timeout_s)
        except Exception as e:  # noqa: BLE001 - re-raised naming the member
            raise UnreadableVideo(f"{name}: {failure_reason(e)}") from None
        return frames, label, name
    numbered = sorted((int(m.group(1)), ext) for ext in raw.members if (m := _FRAME.match(ext)))
    if numbered:
        name = f"{raw.key}.{numbered[0][1]} (+{len(numbered) - 1} frames)"
        try:
            with time_limit(timeout_s):
                frames = clip_from_images([raw.members[ext] for _, ext in numbered], num_frames, rng,
                                          min_frames=min_frames)
        except Exception as e:  # noqa: BLE001
            raise UnreadableVideo(f"{name}: {failure_reason(e)}") from None
        return frames, label, name
    raise UnreadableVideo(f"{raw.key}: no video member (.{'/.'.join(sorted(VIDEO_EXTS)[:4])}...) and no "
                          f"frames ({raw.key}.0000.jpg ...); members: {', '.join(raw.members) or 'none'}")


# ----------------------------------------------------------------------------- order

def buffer_order(n: int, size: int, rng: np.random.Generator) -> list[int]:
    """The order in which a reservoir shuffle with a buffer of ``size`` emits a stream of
    ``n`` items (their positions): fill the buffer, then for each new item emit a random
    buffered one and put the new one in its place; at the end emit the rest shuffled."""
    if size <= 1 or n <= 1:
        return list(range(n))
    size = min(size, n)
    buf, out = list(range(size)), []
    draws = rng.integers(0, size, n - size)
    for p, i in zip(range(size, n), draws):
        out.append(buf[i])
        buf[i] = p
    rng.shuffle(buf)
    return out + buf


class ShardPlan:
    """The batch order of one rank over the shards (see the module doc); what the trainer
    calls the sampler: ``len()`` batches per epoch, ``set_position(epoch, start_batch)``."""

    def __init__(self, counts: Sequence[int], batch_size: int, rank: int, world: int, seed: int,
                 shuffle_buffer: int = 0):
        self.counts = [int(c) for c in counts]
        self.total = sum(self.counts)
        if self.total < batch_size * world:
            raise ValueError(f"the shards hold {self.total} samples, fewer than one global batch "
                             f"({batch_size} x {world} ranks)")
        self.batch_size, self.rank, self.world, self.seed = int(batch_size), int(rank), int(world), int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        self.base = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)  # listing order
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return self.total // (self.batch_size * self.world)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))

    def worker_batches(self, worker: int, workers: int) -> list[int]:
        """The rank batches ``worker`` (logical) serves in an epoch."""
        return list(range(worker, len(self), workers))

    def worker_block(self, worker: int, workers: int) -> tuple[int, int]:
        """``(first position in the epoch's global stream, number of samples)`` of a worker's block."""
        n, b = len(self), self.batch_size
        before = sum(len(range(v, n, workers)) for v in range(worker))
        return self.rank * n * b + before * b, len(self.worker_batches(worker, workers)) * b

    def segments(self, epoch: int, start: int, length: int) -> list[tuple[int, int, int]]:
        """``(shard, first sample, end sample)`` pieces covering global positions ``[start, start + length)``."""
        out, pos, end = [], 0, start + length
        for s in self.shard_order(epoch):
            c = self.counts[s]
            lo, hi = max(start, pos), min(end, pos + c)
            if lo < hi:
                out.append((int(s), lo - pos, hi - pos))
            pos += c
            if pos >= end:
                break
        return out

    def worker_stream(self, worker: int, workers: int, epoch: int, start_batch: int):
        """``(segments, emit order)`` of a logical worker from ``start_batch`` on: the emit order
        lists block offsets, its batches' samples, those of batches before ``start_batch`` left out."""
        start, length = self.worker_block(worker, workers)
        order = buffer_order(length, self.shuffle_buffer,
                             np.random.default_rng([self.seed, epoch, self.rank, worker, 7]))
        skipped = sum(1 for j in self.worker_batches(worker, workers) if j < start_batch)
        return self.segments(epoch, start, length), order[skipped * self.batch_size:]


def keep_batch(batch):
    """The DataLoader's ``collate_fn`` for :class:`ShardDataset`: its items are batches already."""
    return batch


class ShardDataset(IterableDataset):
    """Batches (``collate_skip_bad``'s dicts) of clips from tar shards, in the order of
    ``self.plan`` (a :class:`ShardPlan`, set by ``build_loader``). ``len()``: samples."""

    def __init__(self, paths: Sequence[str], counts: Sequence[int], num_frames: int = 16, size: int = 224,
                 scales: Sequence[float] = DEFAULT_SCALES, flip: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 decode_timeout_s: float = 0.0, min_frames: int = 1):
        if len(paths) != len(counts) or not paths:
            raise ValueError("ShardDataset: needs one sample count per shard, and at least one shard")
        self.paths, self.counts = list(paths), [int(c) for c in counts]
        self.num_frames, self.size = int(num_frames), int(size)
        self.scales, self.flip = tuple(float(s) for s in scales), bool(flip)
        self.mean, self.std = tuple(mean), tuple(std)
        self.decode_timeout_s, self.min_frames = float(decode_timeout_s), int(min_frames)
        self.plan: ShardPlan | None = None

    def __len__(self) -> int:
        return sum(self.counts)

    def _read(self, segments) -> Iterator[tuple[int, object]]:
        """``(index, RawSample or a reason string)`` for every position of ``segments`` in order."""
        for shard, lo, hi in segments:
            path, base = self.paths[shard], int(self.plan.base[shard])
            pos = 0
            try:
                for raw in iter_samples(path):
                    if pos >= lo:
                        yield base + pos, raw
                    pos += 1
                    if pos >= hi:  # the block ends here: read no further
                        break
            except BrokenShard as e:
                logger.warning("broken shard %s: %d of its samples in this block not read", e, hi - max(pos, lo))
                why = f"{e.shard}: not read ({e.reason}{f' at {e.member}' if e.member else ''})"
                for p in range(max(pos, lo), hi):
                    yield base + p, why
                continue
            if pos < hi:
                logger.warning("shard %s holds %d samples, %d were counted: %d not read", path, pos, hi,
                               hi - max(pos, lo))
                for p in range(max(pos, lo), hi):
                    yield base + p, f"{path}: sample {p} missing (the shard changed since it was counted)"

    def _item(self, index: int, raw, epoch: int):
        if isinstance(raw, str):  # lost with a broken shard: warned once for the shard
            return None
        seed = mix64(self.plan.seed, epoch, index)
        rng = np.random.default_rng(seed)
        try:
            frames, label, _ = sample_clip(raw, self.num_frames, rng, seed, min_frames=self.min_frames,
                                           timeout_s=self.decode_timeout_s)
            video = train_transform(frames, self.size, rng, scales=self.scales, flip=self.flip,
                                    mean=self.mean, std=self.std)
        except Exception as e:  # noqa: BLE001 - one bad sample is reported, not raised
            logger.warning("cannot read sample %s:%s", raw.shard, failure_reason(e))
            return None
        return {"video": video, "label": label, "index": index}

    def __iter__(self):
        plan = self.plan
        if plan is None:
            raise RuntimeError("ShardDataset: no plan; build it with ivfast.data.loader.build_loader")
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        epoch, start_batch = plan.epoch, plan.start_batch
        worker = (wid + start_batch) % workers  # the DataLoader's worker 0 serves batch start_batch
        segments, order = plan.worker_stream(worker, workers, epoch, start_batch)
        if not order:
            return
        wanted = set(order)
        held: dict[int, tuple[int, object]] = {}
        b, t, batch = plan.batch_size, 0, []
        for off, (index, raw) in enumerate(self._read(segments)):
            if off in wanted:
                held[off] = (index, raw)
            while t < len(order) and order[t] in held:
                index_t, raw_t = held.pop(order[t])
                t += 1
                batch.append(self._item(index_t, raw_t, epoch))
                if len(batch) == b:
                    yield collate_skip_bad(batch)
                    batch = []
            if t >= len(order):
                break
