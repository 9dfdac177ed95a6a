"""Probe configuration: a common part plus one section per probe.

Loaded with :func:`ivfast.config.load_dataclass` (YAML, ``base:`` chains, dotted
``key=value`` overrides); :func:`validate_probe` checks values. Every error is a one-line
:class:`ivfast.config.ConfigError` naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal

from ivfast.config import ConfigError, load_dataclass
from ivfast.data.config import FRAME_TEMPLATE

__all__ = ["BackboneConfig", "resolve_backbone", "ClassifyConfig", "DepthConfig", "TrackConfig", "ProbeConfig", "load_probe_config",
           "validate_probe", "ConfigError"]


@dataclass
class BackboneConfig:
    """The frozen encoder (:func:`resolve_backbone` picks it, :func:`ivfast.probes.features.load_encoder` loads it).

    Naming a backbone selects it: ``export_dir`` (an ``ivfast-export`` directory, either layout)
    or ``checkpoint`` (a training checkpoint + its run ``config.yaml``). ``source``: ``auto``
    (whichever is named; both or neither is an error), ``export`` / ``checkpoint`` (that one;
    when only the other is named, the named one is used and the log says so), or ``random`` (a
    randomly initialised encoder of the ``random_*`` size, seeded by ``random_seed``, for smoke
    tests and a chance-level baseline; used only when neither path is named).

    ``adapt_clips``: clips whose size differs from the backbone's ``img_size`` are resized to it
    (bilinear), and a frame count other than the backbone's resamples its position table in
    time; with ``false`` any difference stops the probe before training. A frame count that is
    not a multiple of the backbone's tubelet always stops it (one line naming both sides)."""

    source: Literal["auto", "export", "checkpoint", "random"] = "auto"
    export_dir: str = ""
    checkpoint: str = ""
    run_config: str = ""  # default: the config.yaml of the checkpoint's run directory
    layer: int = -1  # block whose output is probed (-1: the last)
    adapt_clips: bool = True
    random_width: int = 64
    random_depth: int = 2
    random_heads: int = 4
    random_patch: int = 8
    random_img_size: int = 32
    random_frames: int = 4
    random_seed: int = 0


def resolve_backbone(b: BackboneConfig) -> tuple[str, str]:
    """``(source, note)``: the backbone ``b`` selects (``export``, ``checkpoint`` or ``random``)
    and a note (empty, or why ``b.source`` was set aside). Rule: a named path wins over
    ``source: random`` and over a ``source`` naming the other kind; both paths named need
    ``source: export`` or ``checkpoint`` to pick one; nothing named needs ``source: random``.
    Raises a one-line :class:`ConfigError` naming the key."""
    named = [k for k, v in (("export", b.export_dir), ("checkpoint", b.checkpoint)) if v]
    if len(named) == 2:
        if b.source in ("export", "checkpoint"):
            other = "checkpoint" if b.source == "export" else "export_dir"
            return b.source, f"backbone.{other} is named too but backbone.source = {b.source!r} picks the {b.source}"
        raise ConfigError(f"config error: backbone.source = {b.source!r}: backbone.export_dir ({b.export_dir!r}) and "
                          f"backbone.checkpoint ({b.checkpoint!r}) are both named: keep one, or set backbone.source "
                          "to export or checkpoint")
    if len(named) == 1:
        got = named[0]
        key = "export_dir" if got == "export" else "checkpoint"
        if b.source not in ("auto", got):
            return got, (f"backbone.source = {b.source!r} set aside: backbone.{key} names the backbone "
                         f"({getattr(b, key)!r})")
        return got, ""
    if b.source == "random":
        return "random", ""
    if b.source == "checkpoint":
        raise ConfigError("config error: backbone.checkpoint = '': required when backbone.source = 'checkpoint'")
    raise ConfigError(f"config error: backbone.export_dir = '': name the backbone (backbone.export_dir=DIR of "
                      f"ivfast-export, or backbone.checkpoint=RUN), or set backbone.source=random for a random "
                      f"encoder (backbone.source = {b.source!r})")


@dataclass
class ClassifySweep:
    """Heads trained side by side on the same frozen features: one per (lr, weight_decay) of
    the grid ``lr`` x ``weight_decay`` (lr-major order); an empty list stands for the
    top-level ``lr`` / ``weight_decay``, so both empty is the single head of those values."""

    lr: List[float] = field(default_factory=list)
    weight_decay: List[float] = field(default_factory=list)


@dataclass
class ClassifyConfig:
    data: Literal["synthetic", "list"] = "synthetic"
    train_list: str = ""
    val_list: str = ""
    root: str = ""
    frame_template: str = FRAME_TEMPLATE  # file names in a folder of frames (a list line "dir start total")
    num_classes: int = 8
    num_frames: int = 16
    img_size: int = 224
    synthetic_train: int = 64
    synthetic_val: int = 32
    heads: int = 8  # attentive-pooling heads
    label_smoothing: float = 0.1
    cutmix_prob: float = 0.0  # chance that a training batch is cut-mixed
    cutmix_alpha: float = 1.0
    flip: bool = True  # random horizontal flip of training clips
    # RandAugment (ivfast/probes/randaug.py), training clips only
    randaug: bool = False
    randaug_ops: int = 2  # ops drawn per clip
    randaug_magnitude: float = 9.0  # of 10
    randaug_magnitude_std: float = 0.5
    randaug_prob: float = 0.5  # chance that each drawn op is applied
    randaug_timm: str = ""  # a timm string, e.g. "rand-m7-n4-mstd0.5-inc1": replaces the randaug_* numbers
    repeated_aug: int = 1  # each training clip k times per epoch; batch_size counts the copies
    layer_decay: float = 1.0  # fine-tuning only (see classify.layer_decay_groups); frozen probe: must be 1.0
    # Multi-view testing: test_clips temporal clips x test_crops spatial crops per validation
    # video, each view classified, the views' softmax probabilities averaged (test_average)
    test_clips: int = 1
    test_crops: int = 1
    test_average: Literal["softmax", "logits"] = "softmax"
    sweep: ClassifySweep = field(default_factory=ClassifySweep)


@dataclass
class DepthConfig:
    """``head``: ``simple`` (learned per-patch queries cross-attend the last block's tokens,
    ``width`` wide, the paper's Figure 1(b)) or ``temporal`` (a DPT head on four blocks'
    tokens with four temporal-attention modules, after Video Depth Anything, Figure 1(c));
    see :mod:`ivfast.probes.depth`."""

    head: Literal["simple", "temporal"] = "simple"
    # temporal head only
    layers: List[int] = field(default_factory=list)  # the 4 probed blocks; empty: evenly spaced, last included
    dpt_channels: List[int] = field(default_factory=list)  # per-stage widths; empty: backbone width / 8, 4, 2, 1
    dpt_features: int = 128  # width of the fusion path
    temporal_heads: int = 8  # attention heads of each temporal module
    data: Literal["synthetic", "dir"] = "synthetic"
    train_dirs: List[str] = field(default_factory=list)
    val_dirs: List[str] = field(default_factory=list)
    window: int = 16  # frames per window
    stride: int = 5  # frames between window starts
    min_depth: float = 0.001  # valid ground truth: [min_depth, max_depth] metres
    max_depth: float = 10.0
    img_size: int = 224
    width: int = 1536
    heads: int = 16
    synthetic_videos: int = 4
    synthetic_frames: int = 24


@dataclass
class TrackConfig:
    data: Literal["synthetic", "json"] = "synthetic"
    train_annotations: str = ""
    val_annotations: str = ""
    src_height: int = 1280
    src_width: int = 1920
    resize_height: int = 224
    resize_width: int = 336
    crop: int = 224
    src_fps: int = 10
    fps: int = 5
    min_area: float = 0.005
    window: int = 16
    stride: int = 1
    min_start_gap: int = 3
    min_objects: int = 1
    max_objects: int = 25
    min_presence: float = 0.7
    min_cooccur: int = 10
    max_gap: int = 5
    width: int = 256
    heads: int = 8
    l1_weight: float = 1.0
    giou_weight: float = 0.5
    synthetic_videos: int = 6
    synthetic_frames: int = 60


@dataclass
class ProbeConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    output_dir: str = "runs/probe"
    max_steps: int = 0  # > 0 overrides epochs
    epochs: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 0
    warmup_epochs: float = 0.0  # used when warmup_steps is 0: converted with the steps per epoch
    weight_decay: float = 0.05
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    batch_size: int = 8
    eval_batch_size: int = 8
    seed: int = 0
    feature_cache: str = ""  # directory; empty: no caching
    num_workers: int = 0  # DataLoader worker processes for the classify clips (persistent); 0: main process
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 1
    save_every: int = 100
    resume: Literal["auto", "never"] = "auto"
    progress: bool = True
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    track: TrackConfig = field(default_factory=TrackConfig)


def _check(cond: bool, key: str, value, why: str) -> None:
    if not cond:
        raise ConfigError(f"config error: {key} = {value!r}: {why}")


def validate_probe(cfg: ProbeConfig, task: str) -> None:
    """Value checks of the common part and of the ``task`` section (classify | depth | track)."""
    b = cfg.backbone
    resolve_backbone(b)  # a one-line error when no backbone, or two, are named
    _check(bool(cfg.output_dir), "output_dir", cfg.output_dir, "must not be empty")
    _check(cfg.max_steps >= 0, "max_steps", cfg.max_steps, "must be >= 0")
    _check(cfg.epochs >= 1 or cfg.max_steps > 0, "epochs", cfg.epochs, "must be >= 1 (or set max_steps)")
    _check(cfg.lr > 0, "lr", cfg.lr, "must be > 0")
    _check(0 <= cfg.min_lr <= cfg.lr, "min_lr", cfg.min_lr, "must be in [0, lr]")
    _check(cfg.warmup_steps >= 0, "warmup_steps", cfg.warmup_steps, "must be >= 0")
    _check(cfg.warmup_epochs >= 0, "warmup_epochs", cfg.warmup_epochs, "must be >= 0")
    _check(cfg.warmup_steps == 0 or cfg.warmup_epochs == 0, "warmup_epochs", cfg.warmup_epochs,
           "give warmup_steps or warmup_epochs, not both")
    _check(cfg.max_steps > 0 or cfg.warmup_epochs < cfg.epochs, "warmup_epochs", cfg.warmup_epochs,
           f"must be < epochs ({cfg.epochs})")
    _check(cfg.num_workers >= 0, "num_workers", cfg.num_workers, "must be >= 0")
    _check(cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay, "must be >= 0")
    _check(len(cfg.betas) == 2 and all(0 <= x < 1 for x in cfg.betas), "betas", cfg.betas, "must be two values in [0, 1)")
    _check(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be >= 1")
    _check(cfg.eval_batch_size >= 1, "eval_batch_size", cfg.eval_batch_size, "must be >= 1")
    _check(cfg.log_every >= 1, "log_every", cfg.log_every, "must be >= 1")
    _check(cfg.save_every >= 1, "save_every", cfg.save_every, "must be >= 1")
    if task == "classify":
        c = cfg.classify
        if c.data == "list":
            _check(bool(c.train_list), "classify.train_list", c.train_list, "required when classify.data = 'list'")
            _check(bool(c.val_list), "classify.val_list", c.val_list, "required when classify.data = 'list'")
        _check(c.num_classes >= 2, "classify.num_classes", c.num_classes, "must be >= 2")
        _check(c.num_frames >= 1, "classify.num_frames", c.num_frames, "must be >= 1")
        _check(c.img_size >= 8, "classify.img_size", c.img_size, "must be >= 8")
        _check(c.heads >= 1, "classify.heads", c.heads, "must be >= 1")
        _check(0 <= c.label_smoothing < 1, "classify.label_smoothing", c.label_smoothing, "must be in [0, 1)")
        _check(0 <= c.cutmix_prob <= 1, "classify.cutmix_prob", c.cutmix_prob, "must be in [0, 1]")
        _check(c.cutmix_alpha > 0, "classify.cutmix_alpha", c.cutmix_alpha, "must be > 0")
        _check(c.randaug_ops >= 0, "classify.randaug_ops", c.randaug_ops, "must be >= 0")
        _check(0 <= c.randaug_magnitude <= 10, "classify.randaug_magnitude", c.randaug_magnitude, "must be in [0, 10]")
        _check(c.randaug_magnitude_std >= 0, "classify.randaug_magnitude_std", c.randaug_magnitude_std, "must be >= 0")
        _check(0 <= c.randaug_prob <= 1, "classify.randaug_prob", c.randaug_prob, "must be in [0, 1]")
        if c.randaug_timm:
            from ivfast.probes.randaug import parse_rand_augment
            try:
                parse_rand_augment(c.randaug_timm)
            except ValueError as e:
                raise ConfigError(f"config error: classify.randaug_timm = {c.randaug_timm!r}: {e}") from None
        from ivfast.data.config import frame_template_error

        why = frame_template_error(c.frame_template)
        _check(why is None, "classify.frame_template", c.frame_template, why or "")
        _check(c.repeated_aug >= 1, "classify.repeated_aug", c.repeated_aug, "must be >= 1")
        _check(cfg.batch_size % c.repeated_aug == 0, "batch_size", cfg.batch_size,
               f"must be a multiple of classify.repeated_aug ({c.repeated_aug})")
        _check(c.test_clips >= 1, "classify.test_clips", c.test_clips, "must be >= 1")
        _check(c.test_crops >= 1, "classify.test_crops", c.test_crops, "must be >= 1")
        _check(all(x > 0 for x in c.sweep.lr), "classify.sweep.lr", c.sweep.lr, "every lr must be > 0")
        _check(all(x >= 0 for x in c.sweep.weight_decay), "classify.sweep.weight_decay", c.sweep.weight_decay,
               "every weight decay must be >= 0")
        _check(len(set(c.sweep.lr)) == len(c.sweep.lr), "classify.sweep.lr", c.sweep.lr, "has a repeated value")
        _check(len(set(c.sweep.weight_decay)) == len(c.sweep.weight_decay), "classify.sweep.weight_decay",
               c.sweep.weight_decay, "has a repeated value")
        _check(c.layer_decay == 1.0, "classify.layer_decay", c.layer_decay,
               "layer-wise lr decay applies to fine-tuning only; the frozen probe has no backbone layers (use 1.0)")
    elif task == "depth":
        d = cfg.depth
        if d.data == "dir":
            _check(bool(d.train_dirs), "depth.train_dirs", d.train_dirs, "required when depth.data = 'dir'")
            _check(bool(d.val_dirs), "depth.val_dirs", d.val_dirs, "required when depth.data = 'dir'")
        _check(d.window >= 1, "depth.window", d.window, "must be >= 1")
        _check(1 <= d.stride <= d.window, "depth.stride", d.stride, "must be in [1, depth.window]")
        _check(d.min_depth > 0, "depth.min_depth", d.min_depth, "must be > 0")
        _check(d.max_depth > d.min_depth, "depth.max_depth", d.max_depth, "must be > depth.min_depth")
        _check(d.width >= 1 and d.width % d.heads == 0, "depth.width", d.width, f"must be a multiple of depth.heads ({d.heads})")
        _check(d.img_size >= 8, "depth.img_size", d.img_size, "must be >= 8")
        _check(len(d.layers) in (0, 4), "depth.layers", d.layers, "give the 4 probed blocks, or [] for evenly spaced")
        _check(len(d.dpt_channels) in (0, 4) and all(c >= 1 for c in d.dpt_channels), "depth.dpt_channels",
               d.dpt_channels, "give 4 widths >= 1, or [] for backbone width / 8, 4, 2, 1")
        _check(d.dpt_features >= 2, "depth.dpt_features", d.dpt_features, "must be >= 2")
        _check(d.temporal_heads >= 1, "depth.temporal_heads", d.temporal_heads, "must be >= 1")
    elif task == "track":
        t = cfg.track
        if t.data == "json":
            _check(bool(t.train_annotations), "track.train_annotations", t.train_annotations, "required when track.data = 'json'")
            _check(bool(t.val_annotations), "track.val_annotations", t.val_annotations, "required when track.data = 'json'")
        _check(t.crop <= min(t.resize_height, t.resize_width), "track.crop", t.crop, "must fit in the resized frame")
        _check(t.src_fps >= t.fps >= 1 and t.src_fps % t.fps == 0, "track.fps", t.fps, "must divide track.src_fps")
        _check(0 <= t.min_area < 1, "track.min_area", t.min_area, "must be in [0, 1)")
        _check(t.window >= 2, "track.window", t.window, "must be >= 2")
        _check(t.stride >= 1, "track.stride", t.stride, "must be >= 1")
        _check(t.min_start_gap >= 1, "track.min_start_gap", t.min_start_gap, "must be >= 1")
        _check(1 <= t.min_objects <= t.max_objects, "track.min_objects", t.min_objects, "must be in [1, track.max_objects]")
        _check(0 < t.min_presence <= 1, "track.min_presence", t.min_presence, "must be in (0, 1]")
        _check(0 <= t.min_cooccur <= t.window, "track.min_cooccur", t.min_cooccur, "must be in [0, track.window]")
        _check(t.max_gap >= 0, "track.max_gap", t.max_gap, "must be >= 0")
        _check(t.width >= 1 and t.width % t.heads == 0, "track.width", t.width, f"must be a multiple of track.heads ({t.heads})")
    else:
        raise ConfigError(f"config error: unknown probe '{task}' (choose classify, depth or track)")


def load_probe_config(task: str, path: str | None = None, overrides: list[str] = ()) -> ProbeConfig:
    cfg = load_dataclass(ProbeConfig, path, list(overrides))
    validate_probe(cfg, task)
    return cfg
