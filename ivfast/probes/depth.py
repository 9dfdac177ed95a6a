"""Video depth probe: learned per-patch queries cross-attend the frozen tokens and predict one
log-depth per patch; long videos are cut into sliding windows whose predictions are averaged
per frame. Metrics: AbsRel and delta1 (:func:`depth_error_sums`)."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ivfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ivfast.ops.attention import attention
from ivfast.probes.config import ProbeConfig
from ivfast.probes.features import FeatureCache, FrozenBackbone, load_encoder, tokens_for
from ivfast.probes.loop import epoch_order, pick_device, run_training


# ----------------------------------------------------------------------------- metrics
def depth_error_sums(pred: torch.Tensor, gt: torch.Tensor, min_depth: float, max_depth: float) -> dict:
    """Sums for metrics pooled over every pixel of a split: ``{"abs_rel_sum", "delta1_count", "num_pixels"}``.

    Valid pixels: ground truth D finite and in ``[min_depth, max_depth]``; predictions D_hat
    are clamped to that range. AbsRel = mean(|D - D_hat| / D); delta1 = share of valid
    pixels with max(D / D_hat, D_hat / D) < 1.25 (:func:`finish_depth_metrics`).
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape")
    gt = gt.double()
    valid = torch.isfinite(gt) & (gt >= min_depth) & (gt <= max_depth)
    d, p = gt[valid], pred.double()[valid].clamp(min_depth, max_depth)
    ratio = torch.maximum(d / p, p / d)
    return {"abs_rel_sum": float(((d - p).abs() / d).sum()), "delta1_count": float((ratio < 1.25).sum()),
            "num_pixels": int(valid.sum())}


def finish_depth_metrics(s: dict) -> dict:
    n = s["num_pixels"]
    if n == 0:
        raise ValueError("no valid ground-truth depth pixels in the evaluation set")
    return {"abs_rel": s["abs_rel_sum"] / n, "delta1": s["delta1_count"] / n, "num_pixels": n}


# ----------------------------------------------------------------------------- windows
def window_starts(n: int, window: int, stride: int) -> list[int]:
    """Starts of windows of ``window`` frames every ``stride`` frames; one more ending at the
    last frame when the stride does not land there, so every frame is covered."""
    if n < window:
        raise ValueError(f"video of {n} frames is shorter than the depth window of {window} frames")
    starts = list(range(0, n - window + 1, stride))
    if starts[-1] + window < n:
        starts.append(n - window)
    return starts


def average_windows(preds: list[tuple[int, torch.Tensor]], n: int) -> torch.Tensor:
    """Per-frame mean of overlapping window predictions [(start, (T, H, W))] -> (n, H, W)."""
    if not preds:
        raise ValueError("no window predictions to average")
    h, w = preds[0][1].shape[-2:]
    acc = torch.zeros(n, h, w, dtype=torch.float64)
    cnt = torch.zeros(n, 1, 1, dtype=torch.float64)
    for s, p in preds:
        acc[s:s + p.shape[0]] += p.double()
        cnt[s:s + p.shape[0]] += 1
    if (cnt == 0).any():
        raise ValueError(f"frames {torch.nonzero(cnt.flatten() == 0).flatten().tolist()[:5]} are in no window")
    return (acc / cnt).float()


# ----------------------------------------------------------------------------- data
def read_image(path: str) -> np.ndarray:
    """One frame as uint8 (H, W, 3): a ``.npy`` array, or an image file decoded by PyAV."""
    if path.endswith(".npy"):
        return np.load(path)
    import av

    with av.open(path) as c:
        return next(c.decode(video=0)).to_ndarray(format="rgb24")


def read_depth_dir(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(frames uint8 (N, H, W, 3), depth float32 (N, H, W))`` of one video directory::

        VIDEO/frames/000000.png   (or .jpg, or .npy: uint8 (H, W, 3)); any sortable names
        VIDEO/depth/000000.npy    float (H, W) metres, same stem as its frame; <= 0 or NaN = no data
    """
    fdir, ddir = os.path.join(path, "frames"), os.path.join(path, "depth")
    for d in (fdir, ddir):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"depth video {path}: missing directory {d}")
    frames = sorted(f for f in os.listdir(fdir) if f.endswith((".png", ".jpg", ".npy")))
    if not frames:
        raise ValueError(f"depth video {path}: no frames in {fdir}")
    imgs, depths = [], []
    for name in frames:
        stem = os.path.splitext(name)[0]
        dp = os.path.join(ddir, stem + ".npy")
        if not os.path.isfile(dp):
            raise FileNotFoundError(f"depth video {path}: frame {name} has no depth map {dp}")
        img = read_image(os.path.join(fdir, name))
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"{os.path.join(fdir, name)}: expected an RGB image (H, W, 3), got {img.shape}")
        dm = np.load(dp)
        if dm.shape != img.shape[:2]:
            raise ValueError(f"{dp}: depth map is {dm.shape[0]}x{dm.shape[1]} but its frame is "
                             f"{img.shape[0]}x{img.shape[1]}")
        imgs.append(img.astype(np.uint8))
        depths.append(dm.astype(np.float32))
    if len({i.shape for i in imgs}) != 1:
        raise ValueError(f"depth video {path}: frames differ in size")
    return np.stack(imgs), np.stack(depths)


def synthetic_depth_video(n: int, size: int, seed: int, max_depth: float = 10.0):
    """A generated video whose brightness encodes depth: a tilted plane plus a moving near disc."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = rng.uniform(-1, 1, 2)
    frames, depth = [], []
    cx, cy, vx, vy = *rng.uniform(0.3, 0.7, 2), *rng.uniform(-0.02, 0.02, 2)
    for t in range(n):
        plane = 0.5 + 0.25 * (a * x + b * y + 1.0)
        disc = ((x - cx - vx * t) ** 2 + (y - cy - vy * t) ** 2) < 0.04
        d = np.where(disc, 0.15, plane) * max_depth * 0.8  # metres
        g = np.clip(1.0 - d / max_depth, 0, 1)
        img = np.stack([g, g * 0.8 + 0.1, 1 - g], -1)
        frames.append((img * 255).astype(np.uint8))
        depth.append(d.astype(np.float32))
    return np.stack(frames), np.stack(depth)


def to_video(frames: np.ndarray, size: int | None) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> normalised float (3, T, S, S)."""
    v = torch.from_numpy(frames).float().div(255).permute(3, 0, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    v = (v - mean) / std
    if size is not None and v.shape[-2:] != (size, size):
        v = F.interpolate(v, size=(size, size), mode="bilinear", align_corners=False)
    return v


# ----------------------------------------------------------------------------- head
class DepthHead(nn.Module):
    """Learned per-patch queries (one per token of the window's grid) cross-attend the tokens;
    a linear layer gives one log-depth per query, upsampled bilinearly to the frame size."""

    def __init__(self, dim: int, width: int, heads: int, grid: tuple[int, int, int], tubelet: int = 1):
        super().__init__()
        self.grid, self.tubelet, self.heads = tuple(grid), tubelet, heads
        n = grid[0] * grid[1] * grid[2]
        self.queries = nn.Parameter(torch.randn(1, n, width) * 0.02)
        self.norm_kv = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(dim, width), nn.Linear(dim, width)
        self.proj = nn.Linear(width, width)
        self.norm_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, tubelet)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, 1.0)  # exp(1) ~ 2.7 m at start

    def _h(self, x):
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        """tokens (B, N, dim) -> depth (B, T, H, W), positive."""
        b = tokens.shape[0]
        if tokens.shape[1] != self.queries.shape[1]:
            raise ValueError(f"{tokens.shape[1]} tokens for a head built for grid {self.grid}")
        kv = self.norm_kv(tokens)
        q = self.q(self.queries).expand(b, -1, -1)
        o = attention(self._h(q), self._h(self.k(kv)), self._h(self.v(kv)))
        o = self.proj(o.transpose(1, 2).reshape(b, q.shape[1], -1)) + self.queries
        logd = self.out(self.norm_out(o))  # (B, N, tubelet)
        t, h, w = self.grid
        logd = logd.reshape(b, t, h, w, self.tubelet).permute(0, 1, 4, 2, 3).reshape(b, t * self.tubelet, h, w)
        logd = F.interpolate(logd, size=out_hw, mode="bilinear", align_corners=False)
        return logd.exp()


def log_l1_loss(pred: torch.Tensor, gt: torch.Tensor, min_depth: float, max_depth: float) -> torch.Tensor:
    """Mean |log D_hat - log D| over the valid pixels (0, still differentiable, when there are none)."""
    valid = torch.isfinite(gt) & (gt >= min_depth) & (gt <= max_depth)
    if not valid.any():
        return pred.sum() * 0.0
    return (pred[valid].clamp_min(1e-6).log() - gt[valid].log()).abs().mean()


# ----------------------------------------------------------------------------- run
def load_videos(cfg: ProbeConfig, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    d = cfg.depth
    if d.data == "synthetic":
        base = 0 if split == "train" else 10_000
        return [synthetic_depth_video(d.synthetic_frames, d.img_size, base + i, d.max_depth)
                for i in range(d.synthetic_videos)]
    return [read_depth_dir(p) for p in (d.train_dirs if split == "train" else d.val_dirs)]


def run(cfg: ProbeConfig) -> dict:
    """Train on ``img_size`` windows (depth resized nearest-neighbour); evaluate at the depth
    maps' own resolution, overlapping windows averaged per frame."""
    d = cfg.depth
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    backbone = FrozenBackbone(load_encoder(cfg.backbone), cfg.backbone.layer).to(device)
    grid = backbone.grid(d.window, d.img_size, d.img_size)
    head = DepthHead(backbone.width, d.width, d.heads, grid, backbone.tubelet).to(device)
    train_videos, val_videos = load_videos(cfg, "train"), load_videos(cfg, "val")
    samples = [(v, s) for v, (fr, _) in enumerate(train_videos) for s in window_starts(len(fr), d.window, d.stride)]
    tcache = FeatureCache(cfg.feature_cache, "depth_train") if cfg.feature_cache else None
    vcache = FeatureCache(cfg.feature_cache, "depth_val") if cfg.feature_cache else None

    def clip(videos, v, s):
        fr, dm = videos[v]
        video = to_video(fr[s:s + d.window], d.img_size)
        gt = torch.from_numpy(dm[s:s + d.window])[:, None]
        gt = F.interpolate(gt, size=(d.img_size, d.img_size), mode="nearest")[:, 0]
        return video, gt

    def epoch_batches(epoch, start):
        for idx in epoch_order(len(samples), cfg.batch_size, cfg.seed, epoch)[start:]:
            vids, gts = zip(*(clip(train_videos, *samples[i]) for i in idx))
            yield torch.stack(vids), torch.stack(gts), torch.tensor(idx)

    def loss_fn(batch):
        video, gt, index = batch
        tokens = tokens_for(backbone, video, index, tcache, device)
        pred = head(tokens, (d.img_size, d.img_size))
        return log_l1_loss(pred, gt.to(device), d.min_depth, d.max_depth), {}

    @torch.no_grad()
    def evaluate():
        sums = {"abs_rel_sum": 0.0, "delta1_count": 0.0, "num_pixels": 0}
        key = 0
        for fr, dm in val_videos:
            preds = []
            for s in window_starts(len(fr), d.window, d.stride):
                video = to_video(fr[s:s + d.window], d.img_size)[None]
                tokens = tokens_for(backbone, video, torch.tensor([key]), vcache, device)
                key += 1
                preds.append((s, head(tokens, tuple(dm.shape[1:]))[0].cpu()))
            part = depth_error_sums(average_windows(preds, len(fr)), torch.from_numpy(dm), d.min_depth, d.max_depth)
            for k in sums:
                sums[k] += part[k]
        return finish_depth_metrics(sums)

    steps = len(epoch_order(len(samples), cfg.batch_size, cfg.seed, 0))
    return run_training(cfg, head, epoch_batches, steps, loss_fn, evaluate)
