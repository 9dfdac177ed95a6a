"""Video depth probe with the two heads of the InternVideo-Next paper (supplement B.3):

- ``depth.head: simple`` (:class:`DepthHead`, Figure 1(b)): learned per-patch queries
  cross-attend the frozen tokens of one block and predict one log-depth per patch.
- ``depth.head: temporal`` (:class:`TemporalDepthHead`, Figure 1(c)): a DPT-style spatial
  head on four blocks' tokens with four temporal-attention modules in its fusion stages,
  after Video Depth Anything (Chen et al., CVPR 2025).

Long videos are cut into sliding windows whose predictions are averaged per frame.
Metrics: AbsRel and delta1 (:func:`depth_error_sums`)."""
from __future__ import annotations

import math
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


class _ResidualConv(nn.Module):
    """ReLU-conv3x3-ReLU-conv3x3 with a skip connection (RefineNet's residual conv unit)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _Fusion(nn.Module):
    """DPT fusion stage: refine the coarser path, add the refined skip feature, refine again,
    upsample (bilinear) to ``size`` (default 2x), mix with a 1x1 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.skip_unit, self.unit, self.out = _ResidualConv(c), _ResidualConv(c), nn.Conv2d(c, c, 1)

    def forward(self, x, skip=None, size=None):
        if skip is not None:
            x = x + self.skip_unit(skip)
        x = self.unit(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out(x)


def sinusoid_table(n: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(n, dim) sine-cosine position table (sines in the even channels, cosines in the odd)."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    t = torch.zeros(n, dim, device=device)
    t[:, 0::2] = torch.sin(pos * freq)
    t[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return t.to(dtype)


class TemporalModule(nn.Module):
    """Self-attention along time at every spatial location of a (B, C, T, H, W) map.

    GroupNorm, a linear map in, ``attn_blocks`` pre-LayerNorm attention sub-layers (the
    sine-cosine table of the frame index added to their input) and an MLP, a linear map out,
    added to the input. The output map starts at zero (``zero_init``), so a freshly built
    module is the identity and the head it sits in starts as its spatial head per frame.
    """

    def __init__(self, c: int, heads: int = 8, attn_blocks: int = 2, mlp_ratio: int = 4, zero_init: bool = True):
        super().__init__()
        self.heads = math.gcd(heads, c)
        self.norm = nn.GroupNorm(math.gcd(32, c), c, eps=1e-6)
        self.proj_in = nn.Linear(c, c)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(c) for _ in range(attn_blocks))
        self.qkv = nn.ModuleList(nn.Linear(c, 3 * c) for _ in range(attn_blocks))
        self.attn_out = nn.ModuleList(nn.Linear(c, c) for _ in range(attn_blocks))
        self.mlp = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, mlp_ratio * c), nn.GELU(), nn.Linear(mlp_ratio * c, c))
        self.proj_out = nn.Linear(c, c)
        if zero_init:
            nn.init.zeros_(self.proj_out.weight)
            nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))  # GroupNorm per frame
        y = y.reshape(b, t, c, h * w).permute(0, 3, 1, 2).reshape(b * h * w, t, c)  # one sequence per location
        y = self.proj_in(y)
        pe = sinusoid_table(t, c, y.device, y.dtype)
        nh = self.heads
        for norm, qkv, out in zip(self.attn_norms, self.qkv, self.attn_out):
            q, k, v = qkv(norm(y) + pe).reshape(b * h * w, t, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v)
            y = y + out(o.transpose(1, 2).reshape(b * h * w, t, c))
        y = self.proj_out(y + self.mlp(y))
        return x + y.reshape(b, h * w, t, c).permute(0, 3, 2, 1).reshape(b, c, t, h, w)


class TemporalDepthHead(nn.Module):
    """The paper's temporally aware depth head (InternVideo-Next, supplement B.3, Figure 1(c)),
    after Video Depth Anything (S. Chen, H. Guo, S. Zhu, F. Zhang, Z. Huang, J. Feng, B. Kang:
    "Video Depth Anything: Consistent Depth Estimation for Super-Long Videos", CVPR 2025):
    a DPT-style spatial head with four :class:`TemporalModule` stacked in it.

    Input: the tokens of four backbone blocks concatenated along channels, (B, t*h*w, 4*dim)
    (:class:`MultiLayerBackbone`). Per time slot of the token grid (the spatial head is a 2D
    network run on every frame):

    - reassemble: block i's tokens as a (dim, h, w) map, a 1x1 conv to ``channels[i]``, then
      resized to 4x, 2x, 1x and 1/2x of the patch grid (transposed convs 4/4, 2/2; identity;
      conv 3x3 stride 2);
    - **temporal modules 1, 2** on the two coarsest reassembled maps (stages 3 and 4);
    - 3x3 convs to ``features`` channels, then four fusion stages from coarse to fine, with
      **temporal modules 3, 4** after the first two fusion stages;
    - output: conv 3x3 (features/2), bilinear to the input resolution (grid x patch size), conv
      3x3 (32), ReLU, conv 1x1 to ``tubelet`` log-depths (one per frame of the time slot).

    The temporal modules attend along the t time slots of the window, per spatial location.
    Their output maps start at zero, so at initialisation the head is its spatial head
    (``temporal=False``) applied frame by frame. Returns depth = exp(log-depth), bilinearly
    resized to ``out_hw``.
    """

    def __init__(self, dim: int, grid: tuple[int, int, int], patch: int, tubelet: int = 1,
                 channels: tuple[int, ...] | list[int] = (), features: int = 128, temporal_heads: int = 8,
                 temporal: bool = True):
        super().__init__()
        self.grid, self.patch, self.tubelet, self.dim = tuple(grid), patch, tubelet, dim
        ch = list(channels) or [max(1, dim // 8), max(1, dim // 4), max(1, dim // 2), dim]
        if len(ch) != 4:
            raise ValueError(f"the DPT head needs 4 stage widths, got {ch}")
        self.project = nn.ModuleList(nn.Conv2d(dim, c, 1) for c in ch)
        self.resize = nn.ModuleList([nn.ConvTranspose2d(ch[0], ch[0], 4, stride=4),
                                     nn.ConvTranspose2d(ch[1], ch[1], 2, stride=2),
                                     nn.Identity(),
                                     nn.Conv2d(ch[3], ch[3], 3, stride=2, padding=1)])
        self.to_features = nn.ModuleList(nn.Conv2d(c, features, 3, padding=1, bias=False) for c in ch)
        self.fuse = nn.ModuleList(_Fusion(features) for _ in range(4))  # fine (0) to coarse (3)
        self.temporal = nn.ModuleList([TemporalModule(ch[2], temporal_heads), TemporalModule(ch[3], temporal_heads),
                                       TemporalModule(features, temporal_heads),
                                       TemporalModule(features, temporal_heads)]) if temporal else None
        self.out1 = nn.Conv2d(features, features // 2, 3, padding=1)
        self.out2 = nn.Sequential(nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(32, tubelet, 1))
        nn.init.constant_(self.out2[-1].bias, 1.0)  # exp(1) ~ 2.7 m at start, as the simple head

    def _time(self, module: nn.Module | None, x: torch.Tensor, b: int) -> torch.Tensor:
        """Apply a temporal module to per-frame maps (B*t, C, h, w)."""
        if module is None:
            return x
        bt, c, h, w = x.shape
        y = module(x.reshape(b, bt // b, c, h, w).transpose(1, 2))
        return y.transpose(1, 2).reshape(bt, c, h, w)

    def forward(self, tokens: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        """tokens (B, t*h*w, 4*dim) -> depth (B, t*tubelet, H, W), positive."""
        b, n, c4 = tokens.shape
        t, h, w = self.grid
        if n != t * h * w or c4 != 4 * self.dim:
            raise ValueError(f"tokens {tuple(tokens.shape)} for a head built for grid {self.grid} and "
                             f"4 blocks of width {self.dim}")
        maps = tokens.reshape(b * t, h, w, 4, self.dim).permute(3, 0, 4, 1, 2)  # (4, B*t, dim, h, w)
        x = [rs(pj(m)) for m, pj, rs in zip(maps, self.project, self.resize)]
        tm = self.temporal if self.temporal is not None else [None] * 4
        x[2], x[3] = self._time(tm[0], x[2], b), self._time(tm[1], x[3], b)
        f = [conv(xi) for conv, xi in zip(self.to_features, x)]
        p = self._time(tm[2], self.fuse[3](f[3], size=f[2].shape[-2:]), b)
        p = self._time(tm[3], self.fuse[2](p, f[2], size=f[1].shape[-2:]), b)
        p = self.fuse[1](p, f[1], size=f[0].shape[-2:])
        p = self.fuse[0](p, f[0])
        p = F.interpolate(self.out1(p), size=(h * self.patch, w * self.patch), mode="bilinear", align_corners=True)
        logd = self.out2(p)  # (B*t, tubelet, H0, W0)
        if tuple(logd.shape[-2:]) != tuple(out_hw):
            logd = F.interpolate(logd, size=tuple(out_hw), mode="bilinear", align_corners=False)
        return logd.reshape(b, t * self.tubelet, *logd.shape[-2:]).exp()


def default_layers(depth: int) -> list[int]:
    """Four evenly spaced blocks ending at the last: (i + 1) * depth // 4 - 1 (ViT-B: 2, 5, 8, 11)."""
    return [max(0, (i + 1) * depth // 4 - 1) for i in range(4)]


class MultiLayerBackbone(FrozenBackbone):
    """A :class:`FrozenBackbone` whose tokens are those of several blocks concatenated along
    channels: (B, N, len(layers) * dim), in the order of ``layers`` (repeats allowed)."""

    def __init__(self, encoder, layers: list[int]):
        depth = encoder.depth
        if not layers or any(not -depth <= i < depth for i in layers):
            raise ValueError(f"depth.layers {list(layers)} out of range for an encoder of depth {depth}")
        super().__init__(encoder, list(layers))


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


def run(cfg: ProbeConfig, encoder=None) -> dict:
    """Train on ``img_size`` windows (depth resized nearest-neighbour); evaluate at the depth
    maps' own resolution, overlapping windows averaged per frame. ``encoder``: the backbone
    already loaded from ``cfg.backbone`` (the CLI's), else loaded here."""
    d = cfg.depth
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    encoder = encoder or load_encoder(cfg.backbone)
    if d.head == "temporal":
        layers = list(d.layers) or default_layers(encoder.depth)
        backbone = MultiLayerBackbone(encoder, layers).to(device)
        grid = backbone.grid(d.window, d.img_size, d.img_size)
        head = TemporalDepthHead(backbone.width, grid, backbone.patch_size, backbone.tubelet, d.dpt_channels,
                                 d.dpt_features, d.temporal_heads).to(device)
        split = "depth_temporal_L" + "-".join(str(i) for i in backbone.layers)  # cached tokens differ per head
    else:
        backbone = FrozenBackbone(encoder, cfg.backbone.layer).to(device)
        grid = backbone.grid(d.window, d.img_size, d.img_size)
        head = DepthHead(backbone.width, d.width, d.heads, grid, backbone.tubelet).to(device)
        split = "depth"
    train_videos, val_videos = load_videos(cfg, "train"), load_videos(cfg, "val")
    samples = [(v, s) for v, (fr, _) in enumerate(train_videos) for s in window_starts(len(fr), d.window, d.stride)]
    tcache = FeatureCache(cfg.feature_cache, split + "_train") if cfg.feature_cache else None
    vcache = FeatureCache(cfg.feature_cache, split + "_val") if cfg.feature_cache else None

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
