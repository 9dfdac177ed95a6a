"""RandAugment for video clips, in plain torch, on uint8 ``(T, H, W, C)`` frames: one plan of
ops, magnitudes and signs per clip, applied identically to every frame (temporal
consistency); the data-dependent ops take their statistics over the whole clip."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ivfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize

__all__ = ["OPS", "RandAugment", "OpDraw", "RandAugClips", "apply_op", "autocontrast", "equalize", "invert",
           "posterize", "solarize", "solarize_add", "color", "contrast", "brightness", "sharpness", "affine", "rotate", "shear_x", "shear_y",
           "translate_x", "translate_y"]

MAX_MAGNITUDE = 10.0


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp_(0, 255).to(torch.uint8)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: float) -> torch.Tensor:
    """``b + factor (a - b)`` in float, rounded to uint8 (factor 1: a, factor 0: b)."""
    a = a.float()
    return _to_u8(b + factor * (a - b))


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of (..., 3) uint8 as float (..., 1)."""
    w = torch.tensor([0.299, 0.587, 0.114])
    return (x.float() * w).sum(-1, keepdim=True)


# ----------------------------------------------------------------------------- pixel ops
def invert(x: torch.Tensor) -> torch.Tensor:
    return 255 - x


def posterize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the ``bits`` most significant bits of every value."""
    if not 0 <= bits <= 8:
        raise ValueError(f"posterize: bits must be in [0, 8], got {bits}")
    return x & ((0xFF << (8 - bits)) & 0xFF)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert the values >= ``threshold``."""
    return torch.where(x >= threshold, 255 - x, x)


def solarize_add(x: torch.Tensor, add: float, threshold: float = 128) -> torch.Tensor:
    """Add ``add`` to the values < ``threshold`` (clipped to 255)."""
    return torch.where(x < threshold, _to_u8(x.float() + add), x)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each channel linearly so its clip-wide min -> 0 and max -> 255 (flat channels unchanged)."""
    flat = x.reshape(-1, x.shape[-1])
    lo, hi = flat.min(0).values.float(), flat.max(0).values.float()
    span = hi - lo
    scale = torch.where(span > 0, 255.0 / span.clamp(min=1), torch.ones_like(span))
    lo = torch.where(span > 0, lo, torch.zeros_like(lo))
    return _to_u8((x.float() - lo) * scale)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per channel over the clip (the classic PIL rule: step =
    (count - count of the last used level) // 255, level i -> (cum below i + step // 2) // step)."""
    out = torch.empty_like(x)
    for c in range(x.shape[-1]):
        ch = x[..., c].reshape(-1).long()
        hist = torch.bincount(ch, minlength=256)
        used = hist.nonzero().flatten()
        step = (int(hist.sum()) - int(hist[used[-1]])) // 255
        if step == 0:
            out[..., c] = x[..., c]
            continue
        below = torch.cumsum(hist, 0) - hist
        lut = ((below + step // 2) // step).clamp(max=255).to(torch.uint8)
        out[..., c] = lut[x[..., c].long()]
    return out


def color(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Saturation: blend with the grayscale frames (factor 0: gray, 1: unchanged)."""
    return _blend(x, _gray(x), factor)


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the clip's mean gray level (factor 0: flat gray, 1: unchanged)."""
    return _blend(x, _gray(x).mean(), factor)


def brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with black (factor 0: black, 1: unchanged)."""
    return _blend(x, torch.zeros(()), factor)


def sharpness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with a 3x3 smoothed copy (kernel 1 1 1 / 1 5 1 / 1 1 1, / 13); the border pixels
    keep their values (factor 0: smoothed, 1: unchanged, > 1: sharpened)."""
    t, h, w, c = x.shape
    if h < 3 or w < 3:
        return x.clone()
    k = torch.ones(3, 3)
    k[1, 1] = 5
    k = (k / 13).expand(c, 1, 3, 3)
    xf = x.permute(0, 3, 1, 2).float()
    smooth = xf.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(xf, k, groups=c)
    return _blend(xf, smooth, factor).permute(0, 2, 3, 1).contiguous()


# ----------------------------------------------------------------------------- geometric ops
def affine(x: torch.Tensor, matrix: Sequence[float], fill: Sequence[int]) -> torch.Tensor:
    """Resample every frame with the inverse map ``(a, b, c, d, e, f)``: output pixel (x, y),
    relative to the frame centre, reads the input at ``(a x + b y + c, d x + e y + f)`` (also
    relative to the centre), bilinearly; pixels read from outside the frame blend towards
    ``fill``. ``x``: uint8 (T, H, W, C)."""
    t, h, w, c = x.shape
    a, b, cc, d, e, f = (float(v) for v in matrix)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) - cy, torch.arange(w, dtype=torch.float64) - cx,
                            indexing="ij")
    sx = a * xs + b * ys + cc + cx
    sy = d * xs + e * ys + f + cy
    # align_corners=True: -1 and +1 are the centres of the first and last pixels.
    grid = torch.stack([2 * sx / max(w - 1, 1) - 1, 2 * sy / max(h - 1, 1) - 1], -1).float()
    src = torch.cat([x.permute(0, 3, 1, 2).float(), torch.ones(t, 1, h, w)], 1)
    out = F.grid_sample(src, grid[None].expand(t, h, w, 2), mode="bilinear", padding_mode="zeros",
                        align_corners=True)
    img, cover = out[:, :c], out[:, c:]
    fill_t = torch.tensor([float(v) for v in fill]).view(1, c, 1, 1)
    return _to_u8(img + (1 - cover) * fill_t).permute(0, 2, 3, 1).contiguous()


def rotate(x: torch.Tensor, degrees: float, fill: Sequence[int]) -> torch.Tensor:
    """Rotate counter-clockwise (as seen on screen) by ``degrees`` about the frame centre."""
    r = math.radians(degrees)
    cs, sn = math.cos(r), math.sin(r)
    return affine(x, (cs, -sn, 0.0, sn, cs, 0.0), fill)


def shear_x(x: torch.Tensor, s: float, fill: Sequence[int]) -> torch.Tensor:
    """Output (x, y) reads input (x + s y, y), about the frame centre."""
    return affine(x, (1.0, s, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(x: torch.Tensor, s: float, fill: Sequence[int]) -> torch.Tensor:
    return affine(x, (1.0, 0.0, 0.0, s, 1.0, 0.0), fill)


def translate_x(x: torch.Tensor, pixels: float, fill: Sequence[int]) -> torch.Tensor:
    """Move the content ``pixels`` to the right (negative: left)."""
    return affine(x, (1.0, 0.0, -pixels, 0.0, 1.0, 0.0), fill)


def translate_y(x: torch.Tensor, pixels: float, fill: Sequence[int]) -> torch.Tensor:
    """Move the content ``pixels`` down (negative: up)."""
    return affine(x, (1.0, 0.0, 0.0, 0.0, 1.0, -pixels), fill)


# ----------------------------------------------------------------------------- RandAugment
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")
_SIGNED = {"Rotate", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY"}


@dataclass(frozen=True)
class OpDraw:
    """One drawn operation of a clip's plan: name, magnitude in [0, 10], sign (+1 / -1)."""

    name: str
    magnitude: float
    sign: int = 1


def apply_op(x: torch.Tensor, op: OpDraw, fill: Sequence[int]) -> torch.Tensor:
    """Apply one drawn op to uint8 (T, H, W, C) frames.

    Magnitude m (0..10) -> argument, severity increasing with m: Rotate 30 m/10 degrees;
    ShearX/Y 0.3 m/10; TranslateX/Y 0.45 m/10 of the side; Posterize keeps 8 - round(4 m/10)
    bits; Solarize inverts pixels >= 256 (1 - m/10); SolarizeAdd adds 110 m/10 to pixels <
    128; Color/Contrast/Brightness/Sharpness blend factor 1 +- 0.9 m/10. AutoContrast,
    Equalize and Invert ignore m. The signed ops take ``op.sign``.
    """
    m = op.magnitude / MAX_MAGNITUDE
    s = op.sign
    n = op.name
    if n == "AutoContrast":
        return autocontrast(x)
    if n == "Equalize":
        return equalize(x)
    if n == "Invert":
        return invert(x)
    if n == "Rotate":
        return rotate(x, s * 30.0 * m, fill)
    if n == "Posterize":
        return posterize(x, 8 - int(round(4 * m)))
    if n == "Solarize":
        return solarize(x, 256.0 * (1 - m))
    if n == "SolarizeAdd":
        return solarize_add(x, 110.0 * m)
    if n in ("Color", "Contrast", "Brightness", "Sharpness"):
        fn = {"Color": color, "Contrast": contrast, "Brightness": brightness, "Sharpness": sharpness}[n]
        return fn(x, 1.0 + s * 0.9 * m)
    if n == "ShearX":
        return shear_x(x, s * 0.3 * m, fill)
    if n == "ShearY":
        return shear_y(x, s * 0.3 * m, fill)
    if n == "TranslateX":
        return translate_x(x, s * 0.45 * m * x.shape[2], fill)
    if n == "TranslateY":
        return translate_y(x, s * 0.45 * m * x.shape[1], fill)
    raise ValueError(f"unknown RandAugment op {n!r} (known: {', '.join(OPS)})")


class RandAugment:
    """``RandAugment(num_ops, magnitude, magnitude_std, prob, fill)(frames, rng)``.

    Per clip, :meth:`draw` picks ``num_ops`` operations uniformly from ``ops`` (with
    replacement); each is applied with probability ``prob``, at magnitude
    ``clip(N(magnitude, magnitude_std), 0, 10)`` (see :func:`apply_op`) and, for the signed
    ops, a random sign; the same plan acts on every frame. Geometric ops sample bilinearly
    around the frame centre and fill uncovered pixels with ``fill`` (default: the ImageNet
    mean, which normalises to 0).

    ``frames``: uint8 (T, H, W, C), a torch tensor or a numpy array (the result has the same
    type). ``rng``: a ``numpy.random.Generator``, one per sample, so a run is reproducible.
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5, prob: float = 0.5,
                 fill: Sequence[int] = tuple(int(round(255 * m)) for m in IMAGENET_MEAN), ops: Sequence[str] = OPS):
        if num_ops < 0:
            raise ValueError(f"RandAugment: num_ops must be >= 0, got {num_ops}")
        if not 0 <= magnitude <= MAX_MAGNITUDE:
            raise ValueError(f"RandAugment: magnitude must be in [0, {MAX_MAGNITUDE:g}], got {magnitude}")
        if magnitude_std < 0:
            raise ValueError(f"RandAugment: magnitude_std must be >= 0, got {magnitude_std}")
        if not 0 <= prob <= 1:
            raise ValueError(f"RandAugment: prob must be in [0, 1], got {prob}")
        unknown = [o for o in ops if o not in OPS]
        if unknown or not ops:
            raise ValueError(f"RandAugment: unknown ops {unknown} (known: {', '.join(OPS)})")
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = int(num_ops), float(magnitude), \
            float(magnitude_std), float(prob)
        self.fill, self.ops = tuple(int(v) for v in fill), tuple(ops)

    def draw(self, rng: np.random.Generator) -> list[OpDraw]:
        """The plan of one clip: the ops that will be applied, in order (skipped ones left out).

        Per op slot, in this order: op index, apply draw, magnitude noise, sign."""
        plan = []
        for _ in range(self.num_ops):
            name = self.ops[int(rng.integers(len(self.ops)))]
            apply = rng.random() < self.prob
            m = self.magnitude + (rng.normal(0.0, self.magnitude_std) if self.magnitude_std > 0 else 0.0)
            sign = 1 if rng.random() < 0.5 else -1
            if apply:
                plan.append(OpDraw(name, float(min(max(m, 0.0), MAX_MAGNITUDE)), sign if name in _SIGNED else 1))
        return plan

    def apply(self, frames, plan: Sequence[OpDraw]):
        is_np = isinstance(frames, np.ndarray)
        x = torch.from_numpy(np.ascontiguousarray(frames)) if is_np else frames
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"RandAugment: frames must be uint8 (T, H, W, C), got {x.dtype} {tuple(x.shape)}")
        if len(self.fill) != x.shape[-1]:
            raise ValueError(f"RandAugment: fill has {len(self.fill)} values for {x.shape[-1]} channels")
        for op in plan:
            x = apply_op(x, op, self.fill)
        return x.numpy() if is_np else x

    def __call__(self, frames, rng: np.random.Generator):
        return self.apply(frames, self.draw(rng))


# Stream id mixed into a sample's seed, so RandAugment's draws do not repeat the crop / flip draws.
RANDAUG_STREAM = 0x52414E44


class RandAugClips(Dataset):
    """``base`` with RandAugment on every readable clip.

    ``base[(index, seed)]`` -> ``{"video": float (C, T, H, W) normalised with ``mean`` /
    ``std``, ...}`` or None. Each clip goes back to uint8 (exact for clips that were uint8
    before normalising, as decoded videos are), through RandAugment, and is normalised again;
    so it runs after the crop, resize and flip, on the smaller frames. The plan comes from
    ``default_rng([seed, RANDAUG_STREAM])``.
    """

    def __init__(self, base, randaug: RandAugment, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        self.base, self.randaug = base, randaug
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def __len__(self) -> int:
        return len(self.base)

    def to_uint8(self, video: torch.Tensor) -> torch.Tensor:
        """Normalised float (C, T, H, W) -> uint8 (T, H, W, C)."""
        m = torch.tensor(self.mean).view(-1, 1, 1, 1)
        s = torch.tensor(self.std).view(-1, 1, 1, 1)
        return _to_u8((video.float() * s + m) * 255.0).permute(1, 2, 3, 0).contiguous()

    def __getitem__(self, key):
        index, seed = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        item = self.base[(index, seed)]
        if item is None:
            return None
        frames = self.randaug(self.to_uint8(item["video"]), np.random.default_rng([seed, RANDAUG_STREAM]))
        return {**item, "video": normalize(frames.permute(0, 3, 1, 2), self.mean, self.std)}
