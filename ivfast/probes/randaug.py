"""RandAugment for video clips as timm defines it, in plain torch, on uint8 ``(T, H, W, C)``
frames: one plan of ops, magnitudes and signs per clip, applied identically to every frame.

The level-to-argument tables (:data:`LEVEL_TO_ARG`), the op lists (:data:`RAND_TRANSFORMS`,
:data:`RAND_INCREASING_TRANSFORMS`), the choice weights and the grammar of the config strings
(:func:`parse_rand_augment`) are ported from timm (pytorch-image-models,
``timm/data/auto_augment.py``, Copyright 2019 Ross Wightman, Apache License 2.0,
https://github.com/huggingface/pytorch-image-models), which VideoMAE, VideoMAEv2, InternVideo
(``datasets/rand_augment.py``) and V-JEPA 2 vendor. The ops reproduce what timm's PIL calls do
to each frame (``ImageOps`` / ``ImageEnhance`` / ``Image.transform`` with bilinear resampling):
the data-dependent ops (AutoContrast, Equalize, Contrast) take their statistics per frame, as
PIL does on each frame of the anchors' clips.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ivfast.data.collate import sample_key
from ivfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize

__all__ = ["LEVEL_DENOM", "LEVEL_TO_ARG", "RAND_TRANSFORMS", "RAND_INCREASING_TRANSFORMS", "RAND_CHOICE_WEIGHTS_W0",
           "RAND_WEIGHTED_0", "OPS", "RandAugment", "OpDraw", "RandAugClips", "parse_rand_augment", "level_to_arg",
           "apply_op", "autocontrast", "equalize", "invert", "posterize", "solarize", "solarize_add", "color", "contrast",
           "brightness", "sharpness", "affine", "rotate", "shear_x", "shear_y", "translate_x", "translate_y",
           "IMG_MEAN_FILL"]

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude m -> fraction m / 10 of each op's range
# timm's hparams["img_mean"] as its create_transform sets it: round(255 * mean), ImageNet mean.
IMG_MEAN_FILL = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)


def _u8(x: torch.Tensor) -> torch.Tensor:
    """Float -> uint8 the way PIL's 8-bit ops store a float: clipped to [0, 255], then truncated."""
    return x.clamp(0, 255).to(torch.uint8)


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL's ``Image.blend(degenerate, image, factor)`` (ImageEnhance's rule): float32
    ``d + factor (x - d)``, clipped and truncated (factor 1: image, 0: degenerate)."""
    d = degenerate.to(torch.float32)
    alpha = torch.tensor(factor, dtype=torch.float32)
    return _u8(d + alpha * (image.to(torch.float32) - d))


def _luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L of uint8 (..., 3): ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``, as (..., 1) uint8."""
    xi = x.to(torch.int32)
    g = (xi[..., 0] * 19595 + xi[..., 1] * 38470 + xi[..., 2] * 7471 + 0x8000) >> 16
    return g.to(torch.uint8).unsqueeze(-1)


# ----------------------------------------------------------------------------- pixel ops (PIL per frame)
def invert(x: torch.Tensor) -> torch.Tensor:
    return 255 - x


def posterize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the ``bits`` most significant bits of every value (``ImageOps.posterize``; timm: 8+
    unchanged; 0 or fewer, reached by ``-inc1`` above m 10: black, as the anchors' Pillow)."""
    bits = int(bits)
    if bits >= 8:
        return x.clone()
    if bits <= 0:
        return torch.zeros_like(x)
    return x & ((0xFF << (8 - bits)) & 0xFF)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert the values >= ``threshold`` (``ImageOps.solarize``; 256: unchanged, 0: all inverted)."""
    return torch.where(x.to(torch.int32) >= threshold, 255 - x, x)  # int32: 256 does not wrap to 0


def solarize_add(x: torch.Tensor, add: int, threshold: int = 128) -> torch.Tensor:
    """Add ``add`` to the values < ``threshold``, capped at 255 (timm's ``solarize_add`` table)."""
    xi = x.to(torch.int32)
    return torch.where(xi < threshold, (xi + int(add)).clamp(0, 255).to(torch.uint8), x)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """``ImageOps.autocontrast`` per frame and channel: ``int(v * 255 / (hi - lo) - lo * 255 / (hi - lo))``
    (truncated); a channel with one level is left as it is."""
    lo = x.amin(dim=(1, 2), keepdim=True).to(torch.float64)
    hi = x.amax(dim=(1, 2), keepdim=True).to(torch.float64)
    span = hi > lo
    # tensor / tensor (a scalar / tensor goes through a reciprocal and can miss PIL's double by an ulp)
    scale = torch.where(span, torch.full_like(hi, 255.0) / torch.where(span, hi - lo, torch.ones_like(hi)),
                        torch.ones_like(hi))
    offset = torch.where(span, -lo * scale, torch.zeros_like(lo))
    return _u8(torch.trunc(x.to(torch.float64) * scale + offset))


def equalize(x: torch.Tensor) -> torch.Tensor:
    """``ImageOps.equalize`` per frame and channel: with ``step = (count - count of the last used
    level) // 255``, level i -> ``(step // 2 + count below i) // step`` (capped at 255); a
    channel with one used level, or with step 0, is left as it is."""
    t, h, w, c = x.shape
    rows = torch.arange(t * c).view(t, 1, 1, c) * 256
    hist = torch.bincount((x.long() + rows).flatten(), minlength=256 * t * c).view(t * c, 256)
    levels = torch.arange(256).expand(t * c, 256)
    last = torch.where(hist > 0, levels, torch.full_like(levels, -1)).amax(1)
    step = (hist.sum(1) - hist.gather(1, last.clamp(min=0)[:, None])[:, 0]) // 255
    keep = ((hist > 0).sum(1) <= 1) | (step == 0)
    below = torch.cumsum(hist, 1) - hist
    lut = ((step[:, None] // 2 + below) // step.clamp(min=1)[:, None]).clamp(max=255)
    lut = torch.where(keep[:, None], levels, lut).to(torch.uint8)  # (t * c, 256)
    src = x.permute(0, 3, 1, 2).reshape(t * c, h * w).long()
    return lut.gather(1, src).view(t, c, h, w).permute(0, 2, 3, 1).contiguous()


def color(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``ImageEnhance.Color``: blend with the frame's L (grayscale) copy (0: gray, 1: unchanged)."""
    return _blend(_luma(x).expand_as(x), x, factor)


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``ImageEnhance.Contrast``: blend with each frame's mean L level, ``int(mean + 0.5)``."""
    t = x.shape[0]
    g = _luma(x).reshape(t, -1)
    mean = torch.floor(g.sum(1, dtype=torch.int64).to(torch.float64) / g.shape[1] + 0.5)
    return _blend(mean.view(t, 1, 1, 1).expand_as(x), x, factor)


def brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``ImageEnhance.Brightness``: blend with black (0: black, 1: unchanged)."""
    return _blend(torch.zeros_like(x), x, factor)


def sharpness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``ImageEnhance.Sharpness``: blend with PIL's SMOOTH copy (kernel 1 1 1 / 1 5 1 / 1 1 1,
    / 13, rounded; border pixels keep their values) (0: smoothed, 1: unchanged, > 1: sharper)."""
    t, h, w, c = x.shape
    if h < 3 or w < 3:
        return x.clone()
    k = torch.ones(3, 3)
    k[1, 1] = 5
    xf = x.permute(0, 3, 1, 2).reshape(t * c, 1, h, w).to(torch.float32)
    smooth = xf.clone()
    total = F.conv2d(xf, k.view(1, 1, 3, 3)).to(torch.float64)  # integer sums <= 3315: exact in float32
    smooth[:, :, 1:-1, 1:-1] = torch.floor(total / 13 + 0.5).to(torch.float32)
    smooth = smooth.view(t, c, h, w).permute(0, 2, 3, 1)
    return _blend(smooth, x, factor)


# ----------------------------------------------------------------------------- geometric ops (PIL affine)
def affine(x: torch.Tensor, matrix: Sequence[float], fill: Sequence[int]) -> torch.Tensor:
    """``Image.transform(size, AFFINE, (a, b, c, d, e, f), BILINEAR, fillcolor=fill)`` on every
    frame: output pixel (i, j) reads the input at ``(x, y) = (a u + b v + c, d u + e v + f)``,
    ``(u, v) = (j + 0.5, i + 0.5)`` (PIL's corner-origin coordinates); points outside
    ``[0, W) x [0, H)`` get ``fill``, the others are bilinear at ``(x - 0.5, y - 0.5)`` with the
    edge pixels repeated, truncated to uint8. ``x``: uint8 (T, H, W, C)."""
    h, w, c = x.shape[1:]
    a, b, cc, d, e, f = (float(v) for v in matrix)
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                          indexing="ij")
    xin = a * u + b * v + cc
    yin = d * u + e * v + f
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    xs, ys = xin - 0.5, yin - 0.5
    x0, y0 = torch.floor(xs), torch.floor(ys)
    dx, dy = (xs - x0)[None, :, :, None], (ys - y0)[None, :, :, None]
    x0, y0 = x0.long(), y0.long()
    xa, xb = x0.clamp(0, w - 1), (x0 + 1).clamp(0, w - 1)
    ya, yb = y0.clamp(0, h - 1), (y0 + 1).clamp(0, h - 1)
    def px(yy, xx):
        return x[:, yy, xx].to(torch.float64)

    p00 = px(ya, xa)
    top = p00 + (px(ya, xb) - p00) * dx
    p10 = px(yb, xa)
    bottom = p10 + (px(yb, xb) - p10) * dx
    out = _u8(torch.trunc(top + (bottom - top) * dy))
    fill_t = torch.tensor([int(v) for v in fill], dtype=torch.uint8).view(1, 1, 1, c)
    return torch.where(inside[None, :, :, None], out, fill_t)


def rotate(x: torch.Tensor, degrees: float, fill: Sequence[int]) -> torch.Tensor:
    """``Image.rotate(degrees, BILINEAR, fillcolor=fill)``: counter-clockwise (as seen on screen)
    about the frame centre; PIL's exact quarter-turn shortcuts included."""
    h, w = x.shape[1:3]
    angle = float(degrees) % 360.0
    if angle == 0:
        return x.clone()
    if angle == 180:
        return x.flip(1).flip(2)
    if angle in (90.0, 270.0) and h == w:
        return torch.rot90(x, 1 if angle == 90 else -1, dims=(1, 2)).contiguous()
    r = -math.radians(angle)
    m = [round(math.cos(r), 15), round(math.sin(r), 15), 0.0, round(-math.sin(r), 15), round(math.cos(r), 15), 0.0]
    cx, cy = w / 2.0, h / 2.0
    m[2] = m[0] * -cx + m[1] * -cy + m[2] + cx
    m[5] = m[3] * -cx + m[4] * -cy + m[5] + cy
    return affine(x, m, fill)


def shear_x(x: torch.Tensor, factor: float, fill: Sequence[int]) -> torch.Tensor:
    """timm's ``shear_x``: output (u, v) reads input (u + factor v, v), about the top-left corner."""
    return affine(x, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(x: torch.Tensor, factor: float, fill: Sequence[int]) -> torch.Tensor:
    """timm's ``shear_y``: output (u, v) reads input (u, v + factor u)."""
    return affine(x, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill)


def translate_x(x: torch.Tensor, pixels: float, fill: Sequence[int]) -> torch.Tensor:
    """timm's ``translate_x_*``: output u reads input u + pixels, so the content moves ``pixels`` to the left."""
    return affine(x, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill)


def translate_y(x: torch.Tensor, pixels: float, fill: Sequence[int]) -> torch.Tensor:
    """timm's ``translate_y_*``: the content moves ``pixels`` up."""
    return affine(x, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill)


# ----------------------------------------------------------------------------- timm's tables (ported)
# Each maps a level (magnitude) in [0, LEVEL_DENOM] (or up to mmax) and a sign (+1 / -1, the
# draw of timm's _randomly_negate; ignored by the unsigned ops) to the op's argument, with
# timm's arithmetic: (level / 10) * range, int() where timm truncates.
def _rotate_level(level: float, sign: int, translate_pct: float) -> float:
    return sign * ((level / LEVEL_DENOM) * 30.0)  # [-30, 30] degrees


def _enhance_level(level: float, sign: int, translate_pct: float) -> float:
    return (level / LEVEL_DENOM) * 1.8 + 0.1  # [0.1, 1.9], no sign: m 5 -> 1.0 (no change)


def _enhance_increasing_level(level: float, sign: int, translate_pct: float) -> float:
    return max(0.1, 1.0 + sign * ((level / LEVEL_DENOM) * 0.9))  # 1 +- [0, 0.9], >= 0.1


def _shear_level(level: float, sign: int, translate_pct: float) -> float:
    return sign * ((level / LEVEL_DENOM) * 0.3)  # [-0.3, 0.3]


def _translate_rel_level(level: float, sign: int, translate_pct: float) -> float:
    return sign * ((level / LEVEL_DENOM) * translate_pct)  # fraction of the side, [-0.45, 0.45]


def _posterize_level(level: float, sign: int, translate_pct: float) -> int:
    return int((level / LEVEL_DENOM) * 4)  # bits kept, 0..4: severity decreases with level


def _posterize_increasing_level(level: float, sign: int, translate_pct: float) -> int:
    return 4 - _posterize_level(level, sign, translate_pct)  # 4..0: severity increases


def _posterize_original_level(level: float, sign: int, translate_pct: float) -> int:
    return int((level / LEVEL_DENOM) * 4) + 4  # 4..8 (AutoAugment paper)


def _solarize_level(level: float, sign: int, translate_pct: float) -> int:
    return min(256, int((level / LEVEL_DENOM) * 256))  # threshold 0..256: severity decreases


def _solarize_increasing_level(level: float, sign: int, translate_pct: float) -> int:
    return 256 - _solarize_level(level, sign, translate_pct)  # 256..0: severity increases


def _solarize_add_level(level: float, sign: int, translate_pct: float) -> int:
    return min(128, int((level / LEVEL_DENOM) * 110))  # added 0..110


LEVEL_TO_ARG: dict[str, Callable[[float, int, float], float] | None] = {
    "AutoContrast": None, "Equalize": None, "Invert": None,
    "Rotate": _rotate_level,
    "Posterize": _posterize_level, "PosterizeIncreasing": _posterize_increasing_level,
    "PosterizeOriginal": _posterize_original_level,
    "Solarize": _solarize_level, "SolarizeIncreasing": _solarize_increasing_level, "SolarizeAdd": _solarize_add_level,
    "Color": _enhance_level, "ColorIncreasing": _enhance_increasing_level,
    "Contrast": _enhance_level, "ContrastIncreasing": _enhance_increasing_level,
    "Brightness": _enhance_level, "BrightnessIncreasing": _enhance_increasing_level,
    "Sharpness": _enhance_level, "SharpnessIncreasing": _enhance_increasing_level,
    "ShearX": _shear_level, "ShearY": _shear_level,
    "TranslateXRel": _translate_rel_level, "TranslateYRel": _translate_rel_level,
}
OPS = tuple(LEVEL_TO_ARG)
# The ops whose argument takes a random sign in timm (_randomly_negate).
_SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing", "ContrastIncreasing",
           "BrightnessIncreasing", "SharpnessIncreasing"}

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS ('-inc1').
RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel")
# '-w0' (the timm version the video anchors vendor: _RAND_CHOICE_WEIGHTS_0, by position in the op list).
RAND_CHOICE_WEIGHTS_W0 = (0.025, 0.005, 0.0, 0.3, 0.0, 0.005, 0.005, 0.025, 0.005, 0.005, 0.025, 0.2, 0.2, 0.1, 0.1)
# '-tweights' (current timm's _RAND_WEIGHTED_0: its own op set, increasing variants).
RAND_WEIGHTED_0 = {"Rotate": 3, "ShearX": 2, "ShearY": 2, "TranslateXRel": 1, "TranslateYRel": 1,
                   "ColorIncreasing": .25, "SharpnessIncreasing": 0.25, "AutoContrast": 0.25, "SolarizeIncreasing": .05,
                   "SolarizeAdd": .05, "ContrastIncreasing": .05, "BrightnessIncreasing": .05, "Equalize": .05,
                   "PosterizeIncreasing": 0.05, "Invert": 0.05}


def level_to_arg(name: str, level: float, sign: int = 1, translate_pct: float = 0.45):
    """timm's ``LEVEL_TO_ARG[name](level)`` with the sign drawn beforehand; None for the ops without argument."""
    if name not in LEVEL_TO_ARG:
        raise ValueError(f"unknown RandAugment op {name!r} (known: {', '.join(OPS)})")
    fn = LEVEL_TO_ARG[name]
    return None if fn is None else fn(float(level), 1 if sign >= 0 else -1, translate_pct)


@dataclass(frozen=True)
class OpDraw:
    """One drawn operation of a clip's plan: timm op name, magnitude (level), sign (+1 / -1)."""

    name: str
    magnitude: float
    sign: int = 1


_ENHANCE = {"Color": color, "Contrast": contrast, "Brightness": brightness, "Sharpness": sharpness}


def apply_op(x: torch.Tensor, op: OpDraw, fill: Sequence[int], translate_pct: float = 0.45) -> torch.Tensor:
    """Apply one drawn op to uint8 (T, H, W, C) frames: the argument is ``level_to_arg(op.name,
    op.magnitude, op.sign)`` (timm's table), the op is timm's PIL call on every frame."""
    arg = level_to_arg(op.name, op.magnitude, op.sign, translate_pct)
    n = op.name
    if n == "AutoContrast":
        return autocontrast(x)
    if n == "Equalize":
        return equalize(x)
    if n == "Invert":
        return invert(x)
    if n == "Rotate":
        return rotate(x, arg, fill)
    if n.startswith("Posterize"):
        return posterize(x, arg)
    if n in ("Solarize", "SolarizeIncreasing"):
        return solarize(x, arg)
    if n == "SolarizeAdd":
        return solarize_add(x, arg)
    base = n.removesuffix("Increasing")
    if base in _ENHANCE:
        return _ENHANCE[base](x, arg)
    if n == "ShearX":
        return shear_x(x, arg, fill)
    if n == "ShearY":
        return shear_y(x, arg, fill)
    if n == "TranslateXRel":
        return translate_x(x, arg * x.shape[2], fill)
    return translate_y(x, arg * x.shape[1], fill)  # TranslateYRel


# ----------------------------------------------------------------------------- config strings
_KEYS = {"m": "magnitude", "n": "num_ops", "p": "prob", "mstd": "magnitude_std", "mmax": "magnitude_max",
         "inc": "increasing", "w": "weights"}


def parse_rand_augment(config: str) -> dict:
    """timm's RandAugment string -> :class:`RandAugment` keyword arguments.

    ``rand`` then dash-separated sections in any order: ``m<int>`` magnitude (default 10),
    ``n<int>`` ops per clip (2), ``p<float>`` chance of each op (0.5), ``mstd<float>``
    magnitude std (0; > 100: uniform in [0, m]), ``mmax<int>`` upper clip of the magnitude
    (10), ``inc<int>`` 1: the increasing op set, ``w0`` the op weights of the timm the video
    anchors vendor (choice without replacement), ``tweights`` current timm's weighted op set.
    E.g. ``rand-m9-n2-mstd0.5``, ``rand-m7-n4-mstd0.5-inc1``. Anything else is a ValueError.
    (timm reads ``inc0`` as increasing, ``bool("0")``; here ``inc0`` is the standard set.)
    """
    parts = str(config).strip().split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment config {config!r}: must start with 'rand' (e.g. 'rand-m9-n2-mstd0.5')")
    out: dict = {"magnitude": LEVEL_DENOM, "num_ops": 2, "prob": 0.5, "magnitude_std": 0.0, "magnitude_max": None}
    increasing, weights, tset = False, None, None
    for part in parts[1:]:
        m = re.fullmatch(r"([a-z]+)(\d[\d.]*)", part)
        if part == "tweights":
            tset = "weights"
            continue
        if m is None or m.group(1) not in _KEYS:
            raise ValueError(f"RandAugment config {config!r}: unknown section {part!r} (known: m<int>, n<int>, "
                             "p<float>, mstd<float>, mmax<int>, inc<0|1>, w0, tweights)")
        key, val = m.groups()
        try:
            if key in ("p", "mstd"):
                num: float = float(val)
            else:
                num = int(val)
        except ValueError:
            raise ValueError(f"RandAugment config {config!r}: section {part!r}: {val!r} is not "
                             f"{'a number' if key in ('p', 'mstd') else 'an integer'}") from None
        if key == "mstd":
            out["magnitude_std"] = float("inf") if num > 100 else num
        elif key == "inc":
            increasing = num != 0
        elif key == "w":
            if num != 0:
                raise ValueError(f"RandAugment config {config!r}: only the weight set w0 exists, got {part!r}")
            weights = RAND_CHOICE_WEIGHTS_W0
        else:
            out[_KEYS[key]] = num
    if tset == "weights":
        out["ops"], out["choice_weights"] = tuple(RAND_WEIGHTED_0), tuple(RAND_WEIGHTED_0.values())
    else:
        out["ops"] = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
        out["choice_weights"] = weights
    return out


# ----------------------------------------------------------------------------- RandAugment
class RandAugment:
    """``RandAugment(num_ops, magnitude, magnitude_std, prob, fill)(frames, rng)``, timm's
    RandAugment on clips; ``RandAugment.from_string("rand-m9-n2-mstd0.5")`` builds it from a
    timm string (:func:`parse_rand_augment`).

    Per clip, :meth:`draw` picks ``num_ops`` ops from ``ops`` (uniformly with replacement, or
    by ``choice_weights`` without replacement, as timm); each is applied with probability
    ``prob``, at magnitude ``N(magnitude, magnitude_std)`` (``inf``: uniform in [0, magnitude])
    clipped to ``[0, magnitude_max or 10]``, and a random sign for the signed ops; the argument
    follows timm's table (:data:`LEVEL_TO_ARG`). The same plan acts on every frame. Geometric
    ops fill uncovered pixels with ``fill`` (default: timm's ``img_mean``, round(255 x the
    ImageNet mean)). Default ``ops``: timm's ``_RAND_TRANSFORMS`` (what ``rand-m9-n2-mstd0.5`` uses).

    ``frames``: uint8 (T, H, W, C), a torch tensor or a numpy array (the result has the same
    type). ``rng``: a ``numpy.random.Generator``, one per sample, so a run is reproducible.
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5, prob: float = 0.5,
                 fill: Sequence[int] = IMG_MEAN_FILL, ops: Sequence[str] = RAND_TRANSFORMS,
                 magnitude_max: float | None = None, choice_weights: Sequence[float] | None = None,
                 translate_pct: float = 0.45):
        if num_ops < 0:
            raise ValueError(f"RandAugment: num_ops must be >= 0, got {num_ops}")
        upper = float(magnitude_max) if magnitude_max else LEVEL_DENOM
        if magnitude < 0:
            raise ValueError(f"RandAugment: magnitude must be >= 0, got {magnitude}")
        if magnitude_std < 0:
            raise ValueError(f"RandAugment: magnitude_std must be >= 0, got {magnitude_std}")
        if not 0 <= prob <= 1:
            raise ValueError(f"RandAugment: prob must be in [0, 1], got {prob}")
        unknown = [o for o in ops if o not in LEVEL_TO_ARG]
        if unknown or not ops:
            raise ValueError(f"RandAugment: unknown ops {unknown} (known: {', '.join(OPS)})")
        if choice_weights is not None:
            w = np.asarray(choice_weights, dtype=np.float64)
            if w.shape != (len(ops),) or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"RandAugment: choice_weights must be {len(ops)} values >= 0, got {choice_weights}")
            if num_ops > int((w > 0).sum()):
                raise ValueError(f"RandAugment: {num_ops} ops without replacement, but only {int((w > 0).sum())} "
                                 "ops have a weight > 0")
            choice_weights = tuple(float(v) for v in w / w.sum())
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = int(num_ops), float(magnitude), \
            float(magnitude_std), float(prob)
        self.upper = upper
        self.fill, self.ops, self.choice_weights = tuple(int(v) for v in fill), tuple(ops), choice_weights
        self.translate_pct = float(translate_pct)

    @classmethod
    def from_string(cls, config: str, fill: Sequence[int] = IMG_MEAN_FILL) -> RandAugment:
        """Build from a timm string such as ``rand-m9-n2-mstd0.5`` or ``rand-m7-n4-mstd0.5-inc1``."""
        return cls(fill=fill, **parse_rand_augment(config))

    def __repr__(self) -> str:
        return (f"RandAugment(n={self.num_ops}, m={self.magnitude:g}, mstd={self.magnitude_std:g}, p={self.prob:g}, "
                f"mmax={self.upper:g}, ops={list(self.ops)}, weights={self.choice_weights})")

    def draw(self, rng: np.random.Generator) -> list[OpDraw]:
        """The plan of one clip: the ops that will be applied, in order (skipped ones left out).

        The op indices first (one ``rng.choice``), then per op: apply draw, magnitude, sign."""
        idx = rng.choice(len(self.ops), self.num_ops, replace=self.choice_weights is None,
                         p=None if self.choice_weights is None else np.asarray(self.choice_weights))
        plan = []
        for i in np.atleast_1d(idx):
            name = self.ops[int(i)]
            apply = self.prob >= 1.0 or rng.random() <= self.prob
            m = self.magnitude
            if self.magnitude_std == float("inf"):
                m = rng.uniform(0.0, self.magnitude)
            elif self.magnitude_std > 0:
                m = rng.normal(self.magnitude, self.magnitude_std)
            sign = -1 if rng.random() > 0.5 else 1
            if apply:
                plan.append(OpDraw(name, float(max(0.0, min(m, self.upper))), sign if name in _SIGNED else 1))
        return plan

    def apply(self, frames, plan: Sequence[OpDraw]):
        is_np = isinstance(frames, np.ndarray)
        x = torch.from_numpy(np.ascontiguousarray(frames)) if is_np else frames
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"RandAugment: frames must be uint8 (T, H, W, C), got {x.dtype} {tuple(x.shape)}")
        if len(self.fill) != x.shape[-1]:
            raise ValueError(f"RandAugment: fill has {len(self.fill)} values for {x.shape[-1]} channels")
        for op in plan:
            x = apply_op(x, op, self.fill, self.translate_pct)
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
        return (video.float() * s + m).mul(255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous()

    def __getitem__(self, key):
        index, seed = sample_key(key)
        item = self.base[(index, seed)]
        if item is None:
            return None
        frames = self.randaug(self.to_uint8(item["video"]), np.random.default_rng([seed, RANDAUG_STREAM]))
        return {**item, "video": normalize(frames.permute(0, 3, 1, 2), self.mean, self.std)}
