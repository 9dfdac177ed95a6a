"""Box-tracking probe: given an object's box in the first frame of a window, predict its boxes
in the other frames from the frozen tokens. Metric: IoU averaged over the (object, frame >= 2)
pairs with a ground-truth box (:func:`mean_iou`).

Pipeline: :func:`preprocess_boxes` / :func:`preprocess_frames` (resize, centre crop),
:func:`downsample` (frame rate), :func:`build_windows` (which windows are kept),
:class:`TrackHead`, :func:`track_loss`.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ivfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ivfast.ops.attention import attention
from ivfast.probes.config import ProbeConfig, TrackConfig
from ivfast.probes.depth import read_image
from ivfast.probes.features import FeatureCache, FrozenBackbone, load_encoder, tokens_for
from ivfast.probes.loop import epoch_order, pick_device, run_training


# ----------------------------------------------------------------------------- box maths
def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of xyxy boxes (..., 4)."""
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_min(0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_min(0)
    inter = iw * ih
    area = lambda x: (x[..., 2] - x[..., 0]).clamp_min(0) * (x[..., 3] - x[..., 1]).clamp_min(0)  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union.clamp_min(1e-12)


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise GIoU = IoU - (|C| - |A u B|) / |C|, C the smallest enclosing box."""
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_min(0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_min(0)
    inter = iw * ih
    area = lambda x: (x[..., 2] - x[..., 0]).clamp_min(0) * (x[..., 3] - x[..., 1]).clamp_min(0)  # noqa: E731
    union = (area(a) + area(b) - inter).clamp_min(1e-12)
    cw = torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])
    ch = torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])
    c = (cw * ch).clamp_min(1e-12)
    return inter / union - (c - union) / c


# ----------------------------------------------------------------------------- preprocessing
def preprocess_boxes(boxes: dict, t: TrackConfig, where: str = "") -> dict:
    """Source-pixel xyxy boxes of one frame -> crop-pixel boxes (numpy float64), small ones dropped.

    Boxes are scaled as the frame is resized (``src`` -> ``resize``), shifted by the centre
    crop's offset and clipped to the crop; a box whose clipped area is under ``min_area`` of
    the crop is dropped (one wholly in the cut-away margin has area 0).

    A box that is not inside the source frame (or has x1 <= x0 / y1 <= y0) is a ValueError."""
    sh, sw = t.src_height, t.src_width
    sy, sx = t.resize_height / sh, t.resize_width / sw
    oy, ox = (t.resize_height - t.crop) / 2, (t.resize_width - t.crop) / 2
    out = {}
    for oid, b in boxes.items():
        b = np.asarray(b, dtype=np.float64)
        if b.shape != (4,) or not np.isfinite(b).all():
            raise ValueError(f"{where}object {oid}: box must be 4 numbers x0 y0 x1 y1, got {b.tolist()}")
        x0, y0, x1, y1 = b
        if x0 < 0 or y0 < 0 or x1 > sw or y1 > sh or x1 <= x0 or y1 <= y0:
            raise ValueError(f"{where}object {oid}: box {b.tolist()} is outside the {sw}x{sh} frame or empty")
        c = np.array([x0 * sx - ox, y0 * sy - oy, x1 * sx - ox, y1 * sy - oy]).clip(0, t.crop)
        if (c[2] - c[0]) * (c[3] - c[1]) < t.min_area * t.crop * t.crop:
            continue
        out[str(oid)] = c
    return out


def downsample(seq: list, src_fps: int, fps: int) -> list:
    """Every (src_fps / fps)-th item, from the first; ``fps`` must divide ``src_fps``."""
    if src_fps % fps:
        raise ValueError(f"fps {fps} does not divide the source fps {src_fps}")
    return seq[:: src_fps // fps]


def preprocess_frames(frames: np.ndarray, t: TrackConfig) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> normalised (3, T, crop, crop): resize, then centre crop."""
    v = torch.from_numpy(np.ascontiguousarray(frames)).float().div(255).permute(3, 0, 1, 2)
    v = F.interpolate(v, size=(t.resize_height, t.resize_width), mode="bilinear", align_corners=False)
    oy, ox = (t.resize_height - t.crop) // 2, (t.resize_width - t.crop) // 2
    v = v[..., oy:oy + t.crop, ox:ox + t.crop]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    return (v - mean) / std


# ----------------------------------------------------------------------------- windows
def check_window(frames: list[dict], start: int, t: TrackConfig) -> str | None:
    """Why the window at ``start`` fails the rules (a short reason), or None when it passes.

    A window of ``window`` frames passes when it has ``min_objects``..``max_objects`` objects
    in its first frame, each present in >= ``min_presence`` of its frames and missing for at
    most ``max_gap`` consecutive frames, and all of them present together in >=
    ``min_cooccur`` frames.
    """
    win = frames[start:start + t.window]
    if len(win) < t.window:
        return "too short"
    ids = list(win[0])
    if not t.min_objects <= len(ids) <= t.max_objects:
        return f"{len(ids)} first-frame objects"
    present = np.array([[oid in f for f in win] for oid in ids])  # (K, T)
    for k, oid in enumerate(ids):
        if present[k].mean() < t.min_presence:
            return f"object {oid} present in {int(present[k].sum())}/{t.window} frames"
        gap = run = 0
        for p in present[k]:
            run = 0 if p else run + 1
            gap = max(gap, run)
        if gap > t.max_gap:
            return f"object {oid} missing for {gap} consecutive frames"
    if int(present.all(0).sum()) < t.min_cooccur:
        return f"first-frame objects co-occur in {int(present.all(0).sum())} frames"
    return None


def build_windows(frames: list[dict], t: TrackConfig) -> list[tuple[int, list[str]]]:
    """Kept windows ``(start, first-frame object ids)`` of one preprocessed, downsampled video:
    starts tried every ``stride`` frames in time order, greedily, a kept start at least
    ``min_start_gap`` frames after the previous kept one, each passing :func:`check_window`."""
    out, last = [], None
    for s in range(0, len(frames) - t.window + 1, t.stride):
        if last is not None and s - last < t.min_start_gap:
            continue
        if check_window(frames, s, t) is None:
            out.append((s, sorted(frames[s])))
            last = s
    return out


# ----------------------------------------------------------------------------- data
def synthetic_track_video(n: int, t: TrackConfig, seed: int):
    """Raw frames uint8 (n, src_h, src_w, 3) at src_fps and per-frame source-pixel boxes of 1-3
    bright rectangles moving over a dark noisy background."""
    rng = np.random.default_rng(seed)
    h, w = t.src_height, t.src_width
    k = int(rng.integers(1, 4))
    size = rng.uniform(0.2, 0.35, (k, 2)) * [w * t.crop / t.resize_width, h]
    lo = np.array([w * (1 - t.crop / t.resize_width) / 2, 0.0])
    hi = np.array([w - lo[0], h]) - size
    p0 = rng.uniform(lo, hi, (k, 2))
    vel = rng.uniform(-0.01, 0.01, (k, 2)) * [w, h]
    colours = rng.uniform(0.5, 1.0, (k, 3))
    frames, boxes = [], []
    for i in range(n):
        img = rng.uniform(0, 0.15, (h, w, 3))
        fb = {}
        for j in range(k):
            p = np.clip(p0[j] + vel[j] * i, lo, hi[j])
            x0, y0 = p
            x1, y1 = p + size[j]
            img[int(y0):int(y1), int(x0):int(x1)] = colours[j]
            fb[str(j)] = [float(x0), float(y0), float(x1), float(y1)]
        frames.append((img * 255).astype(np.uint8))
        boxes.append(fb)
    return np.stack(frames), boxes


def read_annotations(path: str) -> list[dict]:
    """The videos of an annotation file (``track.data = json``), ``frames_dir`` made absolute::

        {"videos": [{"frames_dir": DIR, "height": H, "width": W, "fps": 10,
                     "boxes": [{"<object id>": [x0, y0, x1, y1], ...}, ... one mapping per frame]}]}

    ``DIR`` (relative to the JSON file) holds the frames in sorted order (``.png``/``.jpg``/``.npy``).
    """
    with open(path) as f:
        data = json.load(f)
    videos = data.get("videos") if isinstance(data, dict) else None
    if not isinstance(videos, list) or not videos:
        raise ValueError(f"{path}: expected {{'videos': [...]}} with at least one video")
    base = os.path.dirname(path)
    for v in videos:
        v["frames_dir"] = os.path.join(base, v["frames_dir"])
    return videos


def _load_frames(frames_dir: str) -> np.ndarray:
    names = sorted(f for f in os.listdir(frames_dir) if f.endswith((".png", ".jpg", ".npy")))
    return np.stack([read_image(os.path.join(frames_dir, n)) for n in names])


class TrackWindows:
    """Preprocessed videos and their kept windows; ``[i]`` -> (video (3, T, S, S), first boxes (K, 4),
    boxes (T, K, 4), present (T, K), objects (K,)), boxes normalised to [0, 1], K = max_objects."""

    def __init__(self, raw: list[tuple[np.ndarray, list[dict], int]], t: TrackConfig, name: str):
        self.t, self.videos, self.samples = t, [], []
        for v, (frames, boxes, fps) in enumerate(raw):
            if len(frames) != len(boxes):
                raise ValueError(f"{name} video {v}: {len(frames)} frames but {len(boxes)} box annotations")
            pb = [preprocess_boxes(b, t, f"{name} video {v} frame {i}: ") for i, b in enumerate(boxes)]
            try:
                keep = downsample(list(range(len(frames))), fps, t.fps)
            except ValueError as e:
                raise ValueError(f"{name} video {v}: {e}") from None
            pb = [pb[i] for i in keep]
            self.videos.append((frames[keep], pb))
            self.samples += [(v, s, ids) for s, ids in build_windows(pb, t)]
        if not self.samples:
            raise ValueError(f"{name}: no window of {t.window} frames satisfies the tracking rules "
                             f"(min_presence {t.min_presence}, min_cooccur {t.min_cooccur}, max_gap {t.max_gap}, "
                             f"{t.min_objects}-{t.max_objects} objects)")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        t = self.t
        v, s, ids = self.samples[i]
        frames, pb = self.videos[v]
        video = preprocess_frames(frames[s:s + t.window], t)
        K = t.max_objects
        boxes = torch.zeros(t.window, K, 4)
        present = torch.zeros(t.window, K, dtype=torch.bool)
        for k, oid in enumerate(ids):
            for j in range(t.window):
                b = pb[s + j].get(oid)
                if b is not None:
                    boxes[j, k] = torch.from_numpy(b / t.crop).float()
                    present[j, k] = True
        objects = torch.zeros(K, dtype=torch.bool)
        objects[: len(ids)] = True
        return video, boxes[0].clone(), boxes, present, objects


def load_split(cfg: ProbeConfig, split: str) -> TrackWindows:
    t = cfg.track
    if t.data == "synthetic":
        base = 0 if split == "train" else 10_000
        raw = [(*synthetic_track_video(t.synthetic_frames, t, base + i), t.src_fps) for i in range(t.synthetic_videos)]
    else:
        raw = []
        for v in read_annotations(t.train_annotations if split == "train" else t.val_annotations):
            if (v.get("height"), v.get("width")) != (t.src_height, t.src_width):
                raise ValueError(f"{v['frames_dir']}: annotated as {v.get('width')}x{v.get('height')}, config says "
                                 f"{t.src_width}x{t.src_height}")
            raw.append((_load_frames(v["frames_dir"]), v["boxes"], int(v.get("fps", t.src_fps))))
    return TrackWindows(raw, t, split)


# ----------------------------------------------------------------------------- head
def _cxcywh(b):
    return torch.stack([(b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2,
                        (b[..., 2] - b[..., 0]).clamp_min(1e-4), (b[..., 3] - b[..., 1]).clamp_min(1e-4)], -1)


class TrackHead(nn.Module):
    """first boxes (B, K, 4) + tokens (B, N, dim) -> boxes of frames 2..T (B, T-1, K, 4), xyxy in [0, 1].

    An MLP encodes each first-frame box into a query; one cross-attention layer over the
    tokens; a linear layer regresses, per later frame, the box as an offset of the first one
    (centre shift in units of its size, log scale of width and height, clamped to +-4).
    """

    def __init__(self, dim: int, width: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.query_enc = nn.Sequential(nn.Linear(4, width), nn.GELU(), nn.Linear(width, width))
        self.norm_q, self.norm_kv = nn.LayerNorm(width), nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(dim, width), nn.Linear(dim, width)
        self.proj = nn.Linear(width, width)
        self.norm_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, (window - 1) * 4)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _h(self, x):
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        b, k, _ = first.shape
        x = self.query_enc(_cxcywh(first) * 2 - 1)
        kv = self.norm_kv(tokens)
        o = attention(self._h(self.q(self.norm_q(x))), self._h(self.k(kv)), self._h(self.v(kv)))
        x = x + self.proj(o.transpose(1, 2).reshape(b, k, -1))
        d = self.out(self.norm_out(x)).reshape(b, k, self.window - 1, 4).transpose(1, 2)  # (B, T-1, K, 4)
        c = _cxcywh(first)[:, None]
        cx, cy = c[..., 0] + d[..., 0] * c[..., 2], c[..., 1] + d[..., 1] * c[..., 3]
        w, h = c[..., 2] * d[..., 2].clamp(-4, 4).exp(), c[..., 3] * d[..., 3].clamp(-4, 4).exp()
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def track_loss(pred, boxes, present, l1_weight: float = 1.0, giou_weight: float = 0.5):
    """SmoothL1 + GIoU loss over (frame >= 2, object) pairs with a ground-truth box."""
    gt, m = boxes[:, 1:], present[:, 1:]
    if not m.any():
        return pred.sum() * 0.0
    l1 = F.smooth_l1_loss(pred[m], gt[m], reduction="none").sum(-1).mean()
    giou = (1 - generalized_iou(pred[m], gt[m])).mean()
    return l1_weight * l1 + giou_weight * giou


def mean_iou(pred, boxes, present) -> tuple[float, int]:
    """(sum of IoUs, count) over (frame >= 2, object) pairs with a ground-truth box."""
    m = present[:, 1:]
    return float(box_iou(pred[m], boxes[:, 1:][m]).sum()), int(m.sum())


# ----------------------------------------------------------------------------- run
def _stack(items):
    return [torch.stack(x) for x in zip(*items)]


def run(cfg: ProbeConfig, encoder=None) -> dict:
    """``encoder``: the backbone already loaded from ``cfg.backbone`` (the CLI's), else loaded here."""
    t = cfg.track
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    backbone = FrozenBackbone(encoder or load_encoder(cfg.backbone), cfg.backbone.layer).to(device)
    head = TrackHead(backbone.width, t.width, t.heads, t.window).to(device)
    train, val = load_split(cfg, "train"), load_split(cfg, "val")
    tcache = FeatureCache(cfg.feature_cache, "track_train") if cfg.feature_cache else None
    vcache = FeatureCache(cfg.feature_cache, "track_val") if cfg.feature_cache else None

    def epoch_batches(epoch, start):
        for idx in epoch_order(len(train), cfg.batch_size, cfg.seed, epoch)[start:]:
            yield (*_stack([train[i] for i in idx]), torch.tensor(idx))

    def loss_fn(batch):
        video, first, boxes, present, _, index = batch
        pred = head(tokens_for(backbone, video, index, tcache, device), first.to(device))
        loss = track_loss(pred, boxes.to(device), present.to(device), t.l1_weight, t.giou_weight)
        return loss, {}

    @torch.no_grad()
    def evaluate():
        s, n = 0.0, 0
        for idx in epoch_order(len(val), cfg.eval_batch_size, 0, 0, shuffle=False):
            video, first, boxes, present, _ = _stack([val[i] for i in idx])
            pred = head(tokens_for(backbone, video, torch.tensor(idx), vcache, device), first.to(device)).cpu()
            a, b = mean_iou(pred, boxes, present)
            s, n = s + a, n + b
        return {"mean_iou": s / max(n, 1), "num_pairs": n, "num_windows": len(val)}

    steps = len(epoch_order(len(train), cfg.batch_size, cfg.seed, 0))
    return run_training(cfg, head, epoch_batches, steps, loss_fn, evaluate)
