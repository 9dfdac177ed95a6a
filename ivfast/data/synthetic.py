"""Generated clips of moving textured shapes: the default data set, no files needed."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ivfast.data.collate import sample_key
from ivfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD

_RADICES = (2, 2, 2, 3)  # shape, axis, speed, texture
MAX_CLASSES = int(np.prod(_RADICES))


def _bounce(p0: np.ndarray, v: np.ndarray, t: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Positions p0 + v t reflected into [lo, hi] (a triangle wave): bouncing motion."""
    span = np.maximum(hi - lo, 1e-6)
    u = np.mod(p0 + v * t - lo, 2 * span)
    return lo + span - np.abs(u - span)


class SyntheticClips(Dataset):
    """Generated clips of one or two textured shapes moving over a drifting textured background.

    Objects move at constant velocity and bounce off the borders, so consecutive frames are
    coherent. Clip ``i`` has label ``c = i % num_classes`` (balanced classes), and the label
    fixes what the clip shows (every object of a clip shares it)::

        shape   = c % 2          (0 disc, 1 square)
        axis    = (c // 2) % 2   (0 mostly horizontal, 1 mostly vertical motion)
        speed   = (c // 4) % 2   (0 slow, 1 fast)
        texture = (c // 8) % 3   (0 stripes, 1 checkerboard, 2 gradient)

    An attribute the class count does not reach is drawn at random instead (hence at most
    24 classes). Every attribute is invariant under a horizontal flip, so the flip never
    changes the label. The content of clip ``i`` depends only on ``(content_seed, i)``; the
    key's sample seed only drives the flip (probability 0.5).

    ``__getitem__((index, seed))`` returns ``{"video": float32 (3, T, size, size)
    normalised with mean/std, "label": int, "index": int}``. A plain int key means seed 0.
    """

    def __init__(
        self,
        num_clips: int = 256,
        num_frames: int = 16,
        size: int = 224,
        num_classes: int = 8,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        flip: bool = True,
        content_seed: int = 0,
    ):
        if num_clips <= 0 or num_frames <= 0 or size < 8:
            raise ValueError(f"SyntheticClips: bad sizes num_clips={num_clips} num_frames={num_frames} size={size}")
        if not 1 <= num_classes <= MAX_CLASSES:
            raise ValueError(f"SyntheticClips: num_classes must be in [1, {MAX_CLASSES}], got {num_classes}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("SyntheticClips: mean and std need 3 entries")
        self.num_clips, self.num_frames, self.size = int(num_clips), int(num_frames), int(size)
        self.num_classes, self.flip, self.content_seed = int(num_classes), bool(flip), int(content_seed)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def __len__(self) -> int:
        return self.num_clips

    # ------------------------------------------------------------------ attributes
    def attributes(self, index: int) -> dict:
        """The label-carrying attributes of clip ``index`` (shape, axis, speed, texture)."""
        label = index % self.num_classes
        rng = np.random.default_rng([self.content_seed, index, 1])
        out, prod = {}, 1
        for name, r in zip(("shape", "axis", "speed", "texture"), _RADICES):
            out[name] = (label // prod) % r if self.num_classes > prod else int(rng.integers(r))
            prod *= r
        out["label"] = label
        return out

    def _norm(self, rgb: np.ndarray) -> torch.Tensor:
        """RGB colours in [0, 1], shape (..., 3) -> normalised, shape (3, ...)."""
        c = (np.asarray(rgb, dtype=np.float32) - self.mean) / self.std
        return torch.from_numpy(np.moveaxis(c, -1, 0).copy())

    # ------------------------------------------------------------------ rendering
    def _background(self, rng: np.random.Generator) -> torch.Tensor:
        T, S = self.num_frames, self.size
        t = np.arange(T, dtype=np.float32)
        # The background drifts (a slow camera pan) by a random velocity.
        drift = rng.uniform(-0.01, 0.01, size=2) * S  # px / frame (x, y)
        xs = np.arange(S, dtype=np.float32)[None, :] - drift[0] * t[:, None]  # (T, S)
        ys = np.arange(S, dtype=np.float32)[None, :] - drift[1] * t[:, None]  # (T, S)
        kind = int(rng.integers(3))
        if kind == 0:  # two crossed gratings
            fx, fy = rng.uniform(1.5, 6.0, size=2) * 2 * math.pi / S
            px, py = rng.uniform(0, 2 * math.pi, size=2)
            gx = 0.5 * np.sin(fx * xs + px)
            gy = 0.5 * np.sin(fy * ys + py)
            pattern = 0.5 + 0.5 * (torch.from_numpy(gx)[:, None, :] + torch.from_numpy(gy)[:, :, None])
        elif kind == 1:  # soft checkerboard
            period = rng.uniform(0.12, 0.3) * S
            gx = np.clip(3 * np.sin(math.pi * xs / period), -1, 1)
            gy = np.clip(3 * np.sin(math.pi * ys / period), -1, 1)
            pattern = 0.5 + 0.5 * torch.from_numpy(gx)[:, None, :] * torch.from_numpy(gy)[:, :, None]
        else:  # linear gradient plus a faint grating
            ax, ay = rng.uniform(-1, 1, size=2)
            f = rng.uniform(4, 10) * 2 * math.pi / S
            gx = ax * xs / S * 0.5 + 0.15 * np.sin(f * xs)
            gy = ay * ys / S * 0.5
            pattern = 0.25 + torch.from_numpy(gx)[:, None, :] + torch.from_numpy(gy)[:, :, None]
        pattern = pattern.to(torch.float32).clamp_(0.0, 1.0)  # (T, S, S)
        # Low to moderate contrast so that the objects stand out.
        c0 = rng.uniform(0.1, 0.9, size=3)
        c1 = np.clip(c0 + rng.uniform(-0.35, 0.35, size=3), 0, 1)
        n0 = self._norm(c0).view(3, 1, 1, 1)
        n1 = self._norm(c1).view(3, 1, 1, 1)
        return torch.addcmul(n0.expand(3, T, S, S), n1 - n0, pattern.unsqueeze(0))

    def _draw_object(self, img: torch.Tensor, rng: np.random.Generator, attrs: dict) -> None:
        T, S = self.num_frames, self.size
        t = np.arange(T, dtype=np.float64)
        r = rng.uniform(0.09, 0.18) * S  # half side / radius in px
        speed = (rng.uniform(0.006, 0.016) if attrs["speed"] == 0 else rng.uniform(0.035, 0.06)) * S
        along = speed * rng.choice([-1.0, 1.0])
        across = speed * rng.uniform(-0.15, 0.15)
        v = np.array([along, across]) if attrs["axis"] == 0 else np.array([across, along])  # (vx, vy)
        lo, hi = np.full(2, r), np.full(2, S - 1 - r)
        p0 = rng.uniform(lo, hi)
        cx = _bounce(p0[0], v[0], t, lo[0], hi[0])  # (T,)
        cy = _bounce(p0[1], v[1], t, lo[1], hi[1])

        # A square window of side W per frame, following the object, clipped to the frame.
        win = min(S, 2 * int(math.ceil(r)) + 4)
        x0 = np.clip(np.round(cx).astype(np.int64) - win // 2, 0, S - win)
        y0 = np.clip(np.round(cy).astype(np.int64) - win // 2, 0, S - win)
        ar = np.arange(win)
        xi = x0[:, None] + ar[None, :]  # (T, win)
        yi = y0[:, None] + ar[None, :]
        dx = torch.from_numpy((xi - cx[:, None]).astype(np.float32))[:, None, :]  # (T, 1, win)
        dy = torch.from_numpy((yi - cy[:, None]).astype(np.float32))[:, :, None]  # (T, win, 1)

        if attrs["shape"] == 0:  # disc
            dist = torch.sqrt(dx * dx + dy * dy)
        else:  # square
            dist = torch.maximum(dx.abs(), dy.abs())
        alpha = (r + 0.5 - dist).clamp_(0.0, 1.0)  # anti-aliased edge, (T, win, win)

        tex_kind = attrs["texture"]
        if tex_kind == 0:  # stripes, vertical or horizontal
            period = rng.uniform(0.25, 0.6) * r
            d = dx if rng.random() < 0.5 else dy
            tex = (0.5 + 0.5 * torch.clamp(3 * torch.sin(d * (math.pi / period)), -1, 1))
        elif tex_kind == 1:  # checkerboard
            period = rng.uniform(0.3, 0.7) * r
            tex = 0.5 + 0.5 * (torch.sign(torch.sin(dx * (math.pi / period))) * torch.sign(torch.sin(dy * (math.pi / period))))
        else:  # gradient across the object along a random axis
            d = dx if rng.random() < 0.5 else dy
            tex = ((d / r) * rng.choice([-0.5, 0.5]) + 0.5).clamp(0, 1)
        tex = tex.expand(T, win, win)

        col0 = rng.uniform(0, 1, size=3)
        col1 = rng.uniform(0, 1, size=3)
        if np.abs(col1 - col0).sum() < 0.6:  # keep the texture visible
            col1 = 1.0 - col0
        n0 = self._norm(col0).view(3, 1, 1, 1)
        n1 = self._norm(col1).view(3, 1, 1, 1)
        fg = torch.addcmul(n0, n1 - n0, tex.unsqueeze(0))  # (3, T, win, win)

        tt = torch.arange(T)[:, None, None]
        yy = torch.from_numpy(yi)[:, :, None]
        xx = torch.from_numpy(xi)[:, None, :]
        region = img[:, tt, yy, xx]  # (3, T, win, win)
        region.add_(alpha.unsqueeze(0) * (fg - region))
        img[:, tt, yy, xx] = region

    def render(self, index: int) -> torch.Tensor:
        """The un-augmented clip ``index``: normalised float32 (3, T, size, size).

        Colours are normalised before compositing: alpha compositing is convex, so the
        composite comes out normalised at no extra cost.
        """
        if not 0 <= index < self.num_clips:
            raise IndexError(f"SyntheticClips: index {index} out of range [0, {self.num_clips})")
        attrs = self.attributes(index)
        rng = np.random.default_rng([self.content_seed, index, 2])
        img = self._background(rng)
        for _ in range(int(rng.integers(1, 3))):
            self._draw_object(img, rng, attrs)
        return img

    def __getitem__(self, key):
        index, seed = sample_key(key)
        video = self.render(index)
        if self.flip and np.random.default_rng(seed).random() < 0.5:
            video = video.flip(-1)
        return {"video": video.contiguous(), "label": self.attributes(index)["label"], "index": index}
