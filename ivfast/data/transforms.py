"""Clip augmentation on uint8 frames: TSN multi-scale crop, flip, resize, normalise. One crop and
one flip decision per clip, so every frame of a clip gets the same geometry."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SCALES = (1.0, 0.875, 0.75, 0.66)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DEFAULT_SCALES",
    "multiscale_crop_params",
    "train_transform",
    "eval_transform",
    "normalize",
]


def multiscale_crop_params(
    h: int,
    w: int,
    out_size: int,
    scales: Sequence[float] = DEFAULT_SCALES,
    rng: np.random.Generator | None = None,
    max_distort: int = 1,
) -> tuple[int, int, int, int]:
    """The TSN MultiScaleCrop rule; returns ``(y0, x0, crop_h, crop_w)``.

    Candidate side lengths are ``int(min(h, w) * s)`` for each scale ``s``; a candidate
    within 3 px of ``out_size`` is snapped to ``out_size`` (and, so that the crop stays in
    the frame, then capped at the frame side it is used for). A ``(crop_w, crop_h)`` pair is
    allowed when the scale indices of its two sides differ by at most ``max_distort``; one
    allowed pair is drawn uniformly, then the offset is drawn uniformly over all positions
    that keep the crop inside the frame (TSN's ``fix_crop=False`` variant).

    ``rng=None`` gives a deterministic crop instead: the largest allowed square-scale
    pair (scale index 0 for both sides), centred.
    """
    h, w, out_size = int(h), int(w), int(out_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"multiscale_crop_params: empty frame {h}x{w}")
    if not scales:
        raise ValueError("multiscale_crop_params: scales is empty")
    base = min(h, w)
    sizes = [max(1, int(base * float(s))) for s in scales]
    sizes = [out_size if abs(sz - out_size) < 3 else sz for sz in sizes]
    crop_hs = [min(sz, h) for sz in sizes]
    crop_ws = [min(sz, w) for sz in sizes]
    pairs = [
        (crop_ws[j], crop_hs[i])
        for i in range(len(sizes))
        for j in range(len(sizes))
        if abs(i - j) <= max_distort
    ]
    if rng is None:
        cw, ch = crop_ws[0], crop_hs[0]
        return (h - ch) // 2, (w - cw) // 2, ch, cw
    cw, ch = pairs[int(rng.integers(len(pairs)))]
    y0 = int(rng.integers(h - ch + 1))
    x0 = int(rng.integers(w - cw + 1))
    return y0, x0, ch, cw


def _as_uint8_thwc(frames) -> torch.Tensor:
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a torch tensor or numpy array, got {type(frames).__name__}")
    if frames.dim() != 4:
        raise ValueError(f"frames must be (T, H, W, C), got shape {tuple(frames.shape)}")
    if frames.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8, got {frames.dtype}")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"frames is empty: shape {tuple(frames.shape)}")
    return frames


def _resize_tchw(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Bilinear resize of a uint8 (T, C, H, W) tensor (any memory layout), no antialias.

    Resizing the uint8 frames (torch's uint8 kernel rounds to the nearest integer) is fast on
    a CPU and leaves constant regions exactly constant.
    """
    if x.shape[-2] == out_h and x.shape[-1] == out_w:
        return x
    # A (T, H, W, C) tensor permuted to (T, C, H, W) is already channels_last, the layout
    # torch's fast uint8 bilinear kernel works in.
    x = x.contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=False)


def normalize(x_tchw_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (T, C, H, W) -> float32 (C, T, H, W), ``(x / 255 - mean) / std`` per channel."""
    c = x_tchw_uint8.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {c} channels")
    x = x_tchw_uint8.permute(1, 0, 2, 3).to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(c, 1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(c, 1, 1, 1)
    return x.sub_(m).div_(s).contiguous()


def train_transform(
    frames,
    out_size: int,
    rng: np.random.Generator,
    scales: Sequence[float] = DEFAULT_SCALES,
    flip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    max_distort: int = 1,
) -> torch.Tensor:
    """Training augmentation: multi-scale crop -> resize -> random h-flip -> normalise.

    ``frames``: uint8 ``(T, H, W, C)``. Draws from ``rng`` in a fixed order (crop pair,
    y offset, x offset, then one flip draw only when ``flip`` is True), so a given rng
    state always gives the same output, and with the same seed the ``flip=True`` output
    is either the ``flip=False`` output or its mirror. Returns float32
    ``(C, T, out_size, out_size)``.
    """
    if rng is None:
        raise ValueError("train_transform needs an rng (use eval_transform for a deterministic view)")
    x = _as_uint8_thwc(frames)
    t, h, w, _ = x.shape
    y0, x0, ch, cw = multiscale_crop_params(h, w, out_size, scales, rng, max_distort)
    x = x[:, y0: y0 + ch, x0: x0 + cw, :].permute(0, 3, 1, 2)  # (T, C, ch, cw), channels_last view
    x = _resize_tchw(x, out_size, out_size)
    if flip and rng.random() < 0.5:
        x = x.flip(-1)
    return normalize(x, mean, std)


def resize_short_side(frames, size: int) -> torch.Tensor:
    """uint8 frames ``(T, H, W, C)`` -> uint8 ``(T, C, H', W')`` with the short side ``size``
    and the aspect ratio kept (the long side rounded, at least ``size``): the evaluation views'
    resize."""
    x = _as_uint8_thwc(frames)
    _, h, w, _ = x.shape
    if h <= w:
        new_h, new_w = size, max(size, int(round(w * size / h)))
    else:
        new_h, new_w = max(size, int(round(h * size / w))), size
    return _resize_tchw(x.permute(0, 3, 1, 2), new_h, new_w)


def eval_transform(
    frames,
    out_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Evaluation view: resize the short side to ``out_size`` keeping the aspect ratio,
    centre-crop ``out_size`` x ``out_size``, normalise.

    ``frames``: uint8 ``(T, H, W, C)``. Returns float32 ``(C, T, out_size, out_size)``.
    """
    out_size = int(out_size)
    x = resize_short_side(frames, out_size)
    new_h, new_w = x.shape[-2:]
    y0 = (new_h - out_size) // 2
    x0 = (new_w - out_size) // 2
    x = x[:, :, y0: y0 + out_size, x0: x0 + out_size]
    return normalize(x, mean, std)
