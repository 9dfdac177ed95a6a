"""``ivfast-extract``: features of a frozen video encoder for the videos of a list, to shards.

    ivfast-extract LIST OUT_DIR (--export DIR | --checkpoint CKPT [--run-config YAML])
                   [--root ROOT] [--list-format auto|release|plain|csv]
                   [--mode clip|window] [--frames T] [--stride S] [--size PX]
                   [--pool mean|cls|none] [--layer L] [--format safetensors|npy]
                   [--shard-size N] [--batch-size B] [--device auto|cpu|cuda]
                   [--decode-timeout SECONDS] [--retry-bad]

The backbone is loaded as the probes load it (:func:`ivfast.probes.features.load_backbone`):
the export or the checkpoint named (one of them), its description printed first. LIST: any list :mod:`ivfast.data.lists`
reads. ``--mode clip``: one clip per video, ``--frames`` frames at the middles of equal segments
(the probes' evaluation sampling; a list entry's start/end segment applies); ``--mode window``:
every run of ``--frames`` consecutive frames starting every ``--stride`` frames, plus one ending
at the last frame, so that every frame is in a window. Frames are resized (short side) and
centre-cropped to ``--size`` (default: the backbone's img_size) and normalised with the
export's mean / std; ``--frames`` defaults to the backbone's. ``--pool mean``: the mean of the
patch tokens (D,); ``cls``: the mean of the CLS tokens (D,); ``none``: the patch tokens (N, D).

Written to OUT_DIR:

- ``shard_00000.safetensors`` (one tensor per record, named by its ``key``) or
  ``shard_00000.npy`` (the records stacked, float32; ``key`` is the row), each written to a
  temporary file and renamed, holding the whole of each of its videos;
- ``manifest.jsonl``: one line per record, appended after its shard is on disk::

      {"video": PATH, "index": I, "label": L, "start": S, "end": E, "shard": "shard_00000.safetensors",
       "key": "00000007_000016", "shape": [D]}

  (``start`` / ``end``: the window's first frame and one past its last, decode order; null in
  clip mode), and one line per video that could not be read: ``{"video", "index", "error"}``;
- ``extract.json``: the settings and the backbone; ``summary.json``: counts, and the bad
  videos with their reasons.

Rerunning with the same settings skips every (index, video) the manifest names, unreadable
ones too (``--retry-bad`` tries those again): an interrupted run resumes where its last shard
ended. Exit status: 0; 2 on bad arguments, settings that differ from OUT_DIR's, or clips that
do not fit the backbone; 1 when the backbone or the list cannot be read.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict, deque

import numpy as np
import torch

from ivfast.checkpoint_io import CheckpointError
from ivfast.files import atomic_write_text, save_safetensors
from ivfast.config import ConfigError
from ivfast.data.decode_timeout import Deadline
from ivfast.data.lists import FORMATS, read_list
from ivfast.data.transforms import eval_transform
from ivfast.data.video_list import UnreadableVideo, failure_reason, open_video, read_entry
from ivfast.probes.config import BackboneConfig
from ivfast.probes.features import BackboneMismatch, FrozenBackbone, describe_backbone, load_backbone

MANIFEST, SETTINGS, SUMMARY = "manifest.jsonl", "extract.json", "summary.json"
# What must agree for a rerun to add to OUT_DIR.
SAME = ("list", "mode", "frames", "stride", "size", "pool", "layer", "format", "backbone")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="ivfast-extract", description="Features of a frozen video encoder for the "
                                "videos of a list, to safetensors / .npy shards with a manifest (resumable).")
    p.add_argument("list", help="video list (release 6-field lines, 'path [label]', or CSV)")
    p.add_argument("out_dir", help="output directory (created; a rerun resumes it)")
    p.add_argument("--export", default="", help="an ivfast-export directory (either layout)")
    p.add_argument("--checkpoint", default="", help="a training checkpoint (run dir, step dir or .safetensors)")
    p.add_argument("--run-config", default="", help="the checkpoint's run config (default: its run's config.yaml)")
    p.add_argument("--root", default="", help="directory the list's relative paths are joined to")
    p.add_argument("--list-format", default="auto", choices=FORMATS)
    p.add_argument("--mode", default="clip", choices=("clip", "window"))
    p.add_argument("--frames", type=int, default=0, help="frames per clip / window (default: the backbone's)")
    p.add_argument("--stride", type=int, default=0, help="(window) frames between window starts (default: --frames)")
    p.add_argument("--size", type=int, default=0, help="frame size in px (default: the backbone's img_size)")
    p.add_argument("--pool", default="mean", choices=("mean", "cls", "none"),
                   help="mean of the patch tokens, mean of the CLS tokens, or every patch token")
    p.add_argument("--layer", type=int, default=-1, help="block whose output is taken (-1: the last)")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "npy"))
    p.add_argument("--shard-size", type=int, default=1024, help="records per shard (a shard ends at a video's end)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--decode-timeout", type=float, default=0.0,
                   help="seconds one clip (window mode: one window) may take to decode; 0: no limit")
    p.add_argument("--retry-bad", action="store_true", help="try the videos the manifest lists as unreadable again")
    args = p.parse_args(argv)
    if not args.export and not args.checkpoint:
        p.error("name the backbone: --export DIR or --checkpoint CKPT")
    if args.export and args.checkpoint:
        p.error("give --export or --checkpoint, not both")
    for name in ("frames", "stride", "size"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0")
    if args.shard_size < 1 or args.batch_size < 1:
        p.error("--shard-size and --batch-size must be >= 1")
    if args.stride and args.mode != "window":
        p.error("--stride is for --mode window")
    return args


# ----------------------------------------------------------------------------- reading
def read_manifest(path: str) -> list[dict]:
    """The manifest's lines; a torn last line (a crash while appending) is cut off the file."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    keep = data[:data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return [json.loads(line) for line in keep.decode().splitlines() if line.strip()]


def clip_windows(entry, frames: int, size: int, mean, std, timeout_s: float):
    """The one clip of ``entry`` (segment middles; a video or a folder of frames):
    ``[(None, None, (3, T, S, S))]``."""
    x = read_entry(entry, frames, None, timeout_s=timeout_s)
    yield None, None, eval_transform(x, size, mean=mean, std=std)


def sliding_windows(entry, frames: int, stride: int, size: int, mean, std, timeout_s: float):
    """Windows ``(start, end, (3, T, S, S))`` of ``frames`` consecutive frames every ``stride``
    frames, plus one ending at the last frame; decoded once, keeping only the last ``frames``."""
    buf: deque = deque(maxlen=frames)
    n, last_end = 0, 0
    deadline = Deadline(timeout_s)
    with open_video(entry.path, timeout_s) as container:
        for frame in container.decode(container.streams.video[0]):
            deadline.check()
            buf.append(eval_transform(frame.to_ndarray(format="rgb24")[None], size, mean=mean, std=std))
            n += 1
            start = n - frames
            if start >= 0 and start % stride == 0:
                yield start, n, torch.cat(list(buf), dim=1)
                last_end, deadline = n, Deadline(timeout_s)
    if n == 0:
        raise UnreadableVideo("zero decodable frames")
    if n < frames:
        raise UnreadableVideo(f"too short: {n} frames, fewer than the window of {frames}")
    if last_end != n:
        yield n - frames, n, torch.cat(list(buf), dim=1)


# ----------------------------------------------------------------------------- writing
class ShardWriter:
    """Records into shards (a video never split across two) and the manifest lines after them."""

    def __init__(self, out_dir: str, fmt: str, shard_size: int, first_shard: int):
        self.out_dir, self.fmt, self.shard_size, self.next_shard = out_dir, fmt, shard_size, first_shard
        self.records: list[tuple[dict, torch.Tensor]] = []
        self.manifest = open(os.path.join(out_dir, MANIFEST), "a")
        self.written = 0

    def _append(self, lines: list[dict]) -> None:
        self.manifest.write("".join(json.dumps(x) + "\n" for x in lines))
        self.manifest.flush()
        os.fsync(self.manifest.fileno())

    def add_video(self, idx: int, entry, windows: list) -> None:
        for start, end, feat in windows:
            key = f"{idx:08d}" if start is None else f"{idx:08d}_{start:06d}"
            self.records.append(({"video": entry.path, "index": idx, "label": entry.label, "start": start,
                                  "end": end, "key": key, "shape": list(feat.shape)}, feat))
        if len(self.records) >= self.shard_size:
            self.flush()

    def add_bad(self, idx: int, entry, reason: str) -> None:
        self._append([{"video": entry.path, "index": idx, "error": reason}])

    def flush(self) -> None:
        if not self.records:
            return
        name = f"shard_{self.next_shard:05d}.{self.fmt}"
        path = os.path.join(self.out_dir, name)
        if self.fmt == "safetensors":
            save_safetensors({m["key"]: f for m, f in self.records}, path)
        else:
            tmp = f"{path}.tmp.{os.getpid()}.npy"
            np.save(tmp, torch.stack([f for _, f in self.records]).numpy())
            os.replace(tmp, path)
        lines = []
        for row, (m, _) in enumerate(self.records):
            lines.append({**m, "shard": name, "key": m["key"] if self.fmt == "safetensors" else row})
        self._append(lines)
        self.written += len(self.records)
        self.records, self.next_shard = [], self.next_shard + 1

    def close(self) -> None:
        self.flush()
        self.manifest.close()


# ----------------------------------------------------------------------------- the run
def extract(args) -> dict:
    """Run the extraction of ``args`` (:func:`parse_args`); returns the summary."""
    from ivfast.probes.loop import pick_device

    b = BackboneConfig(source="auto", export_dir=args.export, checkpoint=args.checkpoint, run_config=args.run_config,
                       layer=args.layer)
    encoder, info = load_backbone(b)
    for line in describe_backbone(info, args.layer):
        print(line, flush=True)
    device = pick_device(args.device)
    bb = FrozenBackbone(encoder, args.layer).to(device)
    frames, size = args.frames or bb.num_frames, args.size or bb.img_size
    stride = (args.stride or frames) if args.mode == "window" else 0
    for line in bb.fit(frames, size, size, f"ivfast-extract clips (--frames {frames}, --size {size})"):
        print(f"backbone: {line}", flush=True)
    if args.pool == "cls" and encoder.num_cls == 0:
        raise BackboneMismatch("--pool cls: the backbone has no CLS tokens")
    settings = {"list": os.path.abspath(args.list), "mode": args.mode, "frames": frames, "stride": stride,
                "size": size, "pool": args.pool, "layer": args.layer, "format": args.format,
                "backbone": {"source": info["source"], "path": info["path"]}, "root": args.root,
                "parameters": info["parameters"], "mean": info["mean"], "std": info["std"]}
    os.makedirs(args.out_dir, exist_ok=True)
    spath = os.path.join(args.out_dir, SETTINGS)
    if os.path.isfile(spath):
        with open(spath) as f:
            old = json.load(f)
        diff = [f"{k}: {old.get(k)!r} there, {settings[k]!r} now" for k in SAME if old.get(k) != settings[k]]
        if diff:
            raise ConfigError(f"{args.out_dir} was extracted with other settings ({'; '.join(diff)}): "
                              "use another OUT_DIR")
    atomic_write_text(spath, json.dumps(settings, indent=1) + "\n")

    entries = read_list(args.list, args.root, args.list_format)
    old_lines = read_manifest(os.path.join(args.out_dir, MANIFEST))
    done = {(x["index"], x["video"]) for x in old_lines if "error" not in x or not args.retry_bad}
    shards = [int(x["shard"].split("_")[1].split(".")[0]) for x in old_lines if "shard" in x]
    writer = ShardWriter(args.out_dir, args.format, args.shard_size, max(shards, default=-1) + 1)
    mean, std = info["mean"], info["std"]

    def features(video: torch.Tensor) -> torch.Tensor:
        cls, patch = bb.tokens(video.to(device))
        out = patch.mean(1) if args.pool == "mean" else cls.mean(1) if args.pool == "cls" else patch
        return out.cpu()

    batch: list = []  # (idx, start, end, clip)
    open_videos: "OrderedDict[int, dict]" = OrderedDict()

    def finish_ready():
        for idx in list(open_videos):
            v = open_videos[idx]
            if v["closed"] and v["queued"] == 0:
                writer.add_video(idx, v["entry"], v["windows"])
                del open_videos[idx]

    def run_batch():
        if batch:
            feats = features(torch.stack([c for *_, c in batch]))
            for (idx, start, end, _), f in zip(batch, feats):
                open_videos[idx]["windows"].append((start, end, f.clone()))
                open_videos[idx]["queued"] -= 1
            batch.clear()
        finish_ready()

    skipped = bad_now = 0
    for idx, entry in enumerate(entries):
        if (idx, entry.path) in done:
            skipped += 1
            continue
        open_videos[idx] = {"entry": entry, "windows": [], "queued": 0, "closed": False}
        gen = (clip_windows(entry, frames, size, mean, std, args.decode_timeout) if args.mode == "clip" else
               sliding_windows(entry, frames, stride, size, mean, std, args.decode_timeout))
        it, reason = iter(gen), None
        while True:
            try:
                start, end, clip = next(it)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 - one video's failure is recorded and skipped, never retried here
                reason = failure_reason(e)
                break
            batch.append((idx, start, end, clip))
            open_videos[idx]["queued"] += 1
            if len(batch) >= args.batch_size:
                run_batch()  # a failure here is the backbone's: raised
        if reason is not None:
            print(f"ivfast-extract: cannot read video {entry.path}: {reason}", file=sys.stderr, flush=True)
            batch[:] = [x for x in batch if x[0] != idx]
            del open_videos[idx]
            writer.add_bad(idx, entry, reason)
            bad_now += 1
            continue
        open_videos[idx]["closed"] = True
        finish_ready()
    run_batch()
    writer.close()

    lines = read_manifest(os.path.join(args.out_dir, MANIFEST))
    good = [x for x in lines if "error" not in x]
    good_videos = {(x["index"], x["video"]) for x in good}
    bad = {}
    for x in lines:  # the latest word on each video: a retried video that now reads is no longer bad
        if "error" in x and (x["index"], x["video"]) not in good_videos:
            bad[(x["index"], x["video"])] = x["error"]
    summary = {"videos": len(entries), "videos_done": len(good_videos), "records": len(good),
               "shards": len({x["shard"] for x in good}), "records_now": writer.written,
               "skipped_done": skipped, "bad_now": bad_now, "bad_videos": len(bad),
               "bad": [{"index": i, "video": v, "reason": r} for (i, v), r in sorted(bad.items())]}
    atomic_write_text(os.path.join(args.out_dir, SUMMARY), json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = extract(args)
    except (ConfigError, BackboneMismatch) as e:
        print(f"ivfast-extract: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"ivfast-extract: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in summary.items() if k != "bad"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
