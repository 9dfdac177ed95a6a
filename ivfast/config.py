"""Typed run configuration: dataclasses loaded from YAML, dotted overrides, validation.

A config file is YAML whose keys mirror the dataclasses below. A file may start from
another with ``base: other.yaml`` (resolved beside it); its own keys then override. Command
line overrides are ``section.key=value`` (values parsed as YAML). Every error is a
:class:`ConfigError` whose message is one line naming the key.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, List, Literal

import yaml

from ivfast.data.config import DataConfig
from ivfast.files import atomic_write_text
from ivfast.models.diffloss import DiffusionConfig
from ivfast.models.encoder import EncoderConfig
from ivfast.models.pos_embed import table_time_rows
from ivfast.models.predictor import PredictorConfig
from ivfast.models.stage1 import AlignConfig, Stage1Config
from ivfast.models.stage2 import Stage2ModelConfig
from ivfast.models.teacher import TeacherConfig


class ConfigError(ValueError):
    """A bad configuration value; the message is one line that names the key."""


# The modules whose blocks ``model.checkpointing`` may recompute in backward.
CHECKPOINTABLE = ("encoder", "predictor", "diffusion")
# The optional loggers (train.loggers) and the package each needs; the extra of setup.py has the logger's name.
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
# Keys renamed since: the old name still works, with a FutureWarning.
RENAMED = {"model.lean_mlp": "model.lean_saves"}


@dataclass
class TeacherRunConfig(TeacherConfig):
    layer_interval: float = 3.33
    weights: str = ""
    init_seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # the frozen Stage-1 teacher's dtype; auto: the training dtype
    # the teacher's attention backend; same: model.attention
    attention: Literal["same", "auto", "flash", "sdpa", "flex", "math"] = "same"


@dataclass
class PredictorRunConfig(PredictorConfig):
    init_weights: str = ""  # ModernBERT weights (a local .safetensors) for the predictor's layers


@dataclass
class DiffusionRunConfig(DiffusionConfig):
    reconstruction_ratio: float = 1.0  # share of each sample's masked tokens given to the diffusion loss


@dataclass
class Stage2Config:
    init_checkpoint: str = ""
    teacher_momentum: float = 1.0
    small_blocks: int = 8
    small_scale: float = 0.15
    large_blocks: int = 2
    large_scale: float = 0.7
    aspect_min: float = 0.75
    aspect_max: float = 1.5
    max_visible: int = 0
    # Equal visible counts across the batch: "release" keeps each clip's first visible tokens in
    # time order (later frames may lose all context: prediction forward in time as well as
    # in-filling); "random" keeps a uniformly random subset across all frames.
    equalise: Literal["release", "random"] = "release"
    # Block size: "release" (V-JEPA's) draws one size per batch and view, aspect ratio uniform,
    # area truncated to whole tokens; "log_uniform" draws per block, aspect log-uniform, area rounded.
    block_shape: Literal["release", "log_uniform"] = "release"
    # Position tables of a Stage-1 run with fewer frames: "per_forward" (the release) keeps the
    # checkpoint's time rows and resamples them linearly (align_corners=False) in every forward;
    # "at_load" resamples once when the Stage-1 weights are loaded (align_corners=True).
    pos_resample: Literal["per_forward", "at_load"] = "per_forward"


@dataclass
class ModelConfig:
    stage: Literal[1, 2] = 1
    # "release": the release's init (each block's attention and MLP output projections divided by
    # sqrt(2 * layer), heads trunc-normal(0.02), the patch projection PyTorch's Conv3d default, the
    # predictor ModernBERT's law; ivfast.models.init); "xavier": no rescale, heads xavier-uniform.
    init: Literal["release", "xavier"] = "release"
    # An export directory (ivfast-export, also --from-release) whose encoder starts the run's
    # encoder (Stage 1, Stage 2 or a probe); "": none.
    init_from: str = ""
    recon: Literal["none", "linear", "diffusion"] = "diffusion"
    fused_kernels: bool = True
    attention: Literal["auto", "flash", "sdpa", "flex", "math"] = "auto"
    mask_type: Literal["semantic", "tube"] = "semantic"
    mask_ratio: float = 0.75
    loss_weights: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    checkpointing: List[str] = field(default_factory=list)  # activation checkpointing per block: CHECKPOINTABLE
    lean_saves: bool = True  # autograd keeps less for backward, same values (ivfast.ops.lean; was lean_mlp)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    teacher: TeacherRunConfig = field(default_factory=TeacherRunConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    predictor: PredictorRunConfig = field(default_factory=PredictorRunConfig)
    diffusion: DiffusionRunConfig = field(default_factory=DiffusionRunConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)


@dataclass
class TrainConfig:
    max_steps: int = 0
    epochs: int = 50
    lr: float = 1e-3
    min_lr: float = 1e-6
    # "batch256" (the release): lr and min_lr are per 256 clips, multiplied by the global batch
    # (batch_size x world x grad_accum) / 256 at start; "none": absolute values.
    lr_scaling: Literal["none", "batch256"] = "batch256"
    warmup_epochs: float = 5.0
    warmup_steps: int = 0
    # The lr at the first warmup step (linear from it to lr; scaled as lr under batch256). 0 is
    # the release's schedule: its --warmup_lr 1e-6 is scaled but never reaches cosine_scheduler,
    # whose start_warmup_value stays 0.
    warmup_lr: float = 0.0
    weight_decay: float = 0.05
    # Parameters without weight decay, besides biases and 1-D ones: "release" exempts the
    # encoder's position table and CLS tokens and the alignment position table only (the
    # diffusion position table and the mask token decay); "all_tables": every position table,
    # token and probe.
    no_decay: Literal["release", "all_tables"] = "release"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    clip_grad: float = 5.0
    grad_accum: int = 1
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 1
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: Literal["auto", "never"] = "auto"
    progress: bool = True
    allocator: str = ""  # PYTORCH_CUDA_ALLOC_CONF for the run (the environment's own value wins)
    # Where each log record goes (rank 0): metrics.jsonl, TensorBoard (extra "tensorboard"), W&B (extra "wandb").
    loggers: List[Literal["jsonl", "tensorboard", "wandb"]] = field(default_factory=lambda: ["jsonl"])
    tensorboard_dir: str = ""  # "": <output_dir>/tensorboard
    wandb_project: str = "ivfast"
    wandb_entity: str = ""  # "": the account's default
    wandb_name: str = ""  # "": the output_dir's name
    wandb_mode: Literal["auto", "online", "offline"] = "auto"  # auto: WANDB_MODE from the environment, else online
    # [start step, number of steps]: a torch.profiler chrome trace of those optimiser steps (and on
    # CUDA a memory snapshot) in <output_dir>/profile; []: off.
    profile: List[int] = field(default_factory=list)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    # ZeRO-1/2 keep a persistent bf16 buffer of reduce_bucket_size elements for gradient
    # reduction (contiguous_gradients): 5e8 (DeepSpeed's default, the release's) is 0.93 GiB
    # on every GPU; 5e7 (93 MiB) still reduces in few large collectives.
    reduce_bucket_size: int = 50_000_000
    # Chunk size of the post-step parameter all-gather (ZeRO-1/2; ZeRO-3: the prefetch
    # bucket): no persistent buffer at stages 1-2, so DeepSpeed's default stays.
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    param_persistence_threshold: int = 100_000
    cpu_shm: bool = False


@dataclass
class Config:
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the field type ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config error: {key} = {value!r}: must be one of {_type_name(tp)}")
        return value
    if origin in (list, List):
        if typing.get_args(tp) == (str,) and isinstance(value, str):
            value = [value]  # a list of strings given as one string (e.g. data.shards: "train-{0..9}.tar")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config error: {key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config field type for {key}")
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported config field type for {key}")
    if not ok:
        raise ConfigError(f"config error: {key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return float(value) if tp is float else value


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, name: str, known) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"config error: unknown key '{key}'{hint}")


def _merge_into(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types_ = _fields(type(obj))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if key in RENAMED:
            key = _renamed(key)
            name = key.rsplit(".", 1)[-1]
        if name not in types_:
            raise _unknown(key, str(name), types_)
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            _merge_into(getattr(obj, name), value, key + ".")
        else:
            setattr(obj, name, _coerce(value, tp, key))


# The configs that ship with the package (package data; the repository's ``configs/`` is a link here).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def packaged_configs() -> list[str]:
    """The names of the packaged configs, e.g. ``tiny``, ``probes/probe_classify_ssv2``; sorted."""
    names = []
    for root, _, files in os.walk(CONFIG_DIR):
        rel = os.path.relpath(root, CONFIG_DIR)
        names += [os.path.splitext(f if rel == "." else f"{rel}/{f}")[0].replace(os.sep, "/")
                  for f in files if f.endswith(".yaml")]
    return sorted(names, key=lambda n: (n.count("/"), n))


def resolve_config_path(path: str) -> str:
    """The file a ``--config`` value names: ``path`` itself when it exists (relative to the working
    directory), else the packaged config of that name, with or without ``.yaml`` and a leading
    ``configs/`` (``stage1_b_diffusion``, ``configs/tiny.yaml``, ``probes/probe_classify_ssv2.yaml``).
    Not found: a one-line :class:`ConfigError` that lists the packaged names."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    found = _packaged(path)
    if found is None:
        raise _not_found(path)
    return found


def _packaged(name: str) -> str | None:
    name = name.replace(os.sep, "/")
    while name.startswith("./"):
        name = name[2:]
    if name.startswith("configs/"):
        name = name[len("configs/"):]
    if not name or os.path.isabs(name) or ".." in name.split("/"):
        return None
    for cand in (name, f"{name}.yaml"):
        full = os.path.join(CONFIG_DIR, *cand.split("/"))
        if os.path.isfile(full):
            return full
    return None


def _not_found(path: str) -> ConfigError:
    return ConfigError(f"config error: config file not found: {path} (not a file here, nor a packaged config: "
                       f"{', '.join(packaged_configs())})")


def _read_yaml(path: str, seen: tuple = ()) -> dict:
    if not seen:
        path = resolve_config_path(path)
    if os.path.realpath(path) in seen:
        raise ConfigError(f"config error: 'base' chain loops at {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config error: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path}: top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    # ``base`` is resolved beside the file, else it names a packaged config (a file of one's own
    # may start from ``base: stage1_b_diffusion.yaml`` anywhere).
    beside = os.path.join(os.path.dirname(path), str(base))
    parent_path = beside if os.path.isfile(beside) else _packaged(str(base))
    if parent_path is None:
        raise _not_found(beside)
    parent = _read_yaml(parent_path, seen + (os.path.realpath(path),))
    return _deep_update(parent, data)


def _deep_update(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], raw value string)."""
    if "=" not in text:
        raise ConfigError(f"config error: override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"config error: override '{text}' has an empty key")
    return parts, raw


def _renamed(key: str) -> str:
    new = RENAMED[key]
    warnings.warn(f"config key '{key}' is deprecated: use '{new}'", FutureWarning, stacklevel=4)
    return new


def _apply_override(cfg: Config, text: str) -> None:
    parts, raw = parse_override(text)
    if ".".join(parts) in RENAMED:
        parts = _renamed(".".join(parts)).split(".")
    obj = cfg
    for i, name in enumerate(parts):
        types_ = _fields(type(obj))
        key = ".".join(parts[: i + 1])
        if name not in types_:
            raise _unknown(key, name, types_)
        tp = types_[name]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"config error: '{key}' is a value, not a section")
            obj = getattr(obj, name)
            continue
        if dataclasses.is_dataclass(tp):
            raise ConfigError(f"config error: '{key}' is a section; set one of its keys")
        value = raw if tp is str else _parse_value(raw, key)
        setattr(obj, name, _coerce(value, tp, key))


def _parse_value(raw: str, key: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"config error: {key}: cannot parse value {raw!r}") from None


def load_dataclass(cls, path: str | None = None, overrides: list[str] = ()):
    """Any config dataclass ``cls``: defaults, then the YAML file (``base`` chain), then the overrides.

    Unknown keys and wrong types are one-line :class:`ConfigError` s; value checks are the caller's.
    """
    cfg = cls()
    if path:
        _merge_into(cfg, _read_yaml(path))
    for text in overrides:
        _apply_override(cfg, text)
    return cfg


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file (with its ``base`` chain), then the overrides; validated."""
    cfg = load_dataclass(Config, path, overrides)
    validate(cfg)
    return cfg


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A validated copy of ``cfg`` with dotted ``overrides`` applied."""
    out = copy.deepcopy(cfg)
    for text in overrides:
        _apply_override(out, text)
    validate(out)
    return out


# The release's way of running a Stage-1 step, as a mode of ivfast: none of ivfast's kernels,
# lean saves or chunked diffusion loss, no activation checkpointing, an fp32 teacher with eager
# ("math") attention, an fp32 diffusion head over every masked token, DeepSpeed's default 5e8
# gradient bucket. The memory model (ivfast.memory.analytic.release_way) and the step benchmark
# (benchmarks/step.py) both run it from this list.
RELEASE_WAY = ["model.fused_kernels=false", "model.lean_saves=false", "model.checkpointing=[]",
               "model.diffusion.chunk_rows=0", "model.diffusion.precision=fp32",
               "model.diffusion.reconstruction_ratio=1.0", "model.teacher.precision=fp32",
               "model.teacher.attention=math", "deepspeed.reduce_bucket_size=500000000"]


def chunking_allowed(zero_stage: int) -> bool:
    """Whether ``model.diffusion.chunk_rows`` can take effect under ``deepspeed.zero_stage``: not
    under ZeRO-3, whose parameter gathering and gradient partitioning hooks would be bypassed
    by the ``torch.autograd.grad`` the chunked loss runs inside the forward
    (:mod:`ivfast.ops.chunked_loss`). The step builder switches chunking off there; the memory
    model and the compile check count the head as it then runs."""
    return zero_stage < 3


def stage1_config(cfg: Config) -> Stage1Config:
    """The Stage-1 model's own config, from the run config."""
    m = cfg.model
    return Stage1Config(num_frames=cfg.data.num_frames, img_size=cfg.data.img_size, recon=m.recon,
                        loss_weights=list(m.loss_weights), teacher_width=m.teacher.width,
                        encoder=copy.deepcopy(m.encoder), align=copy.deepcopy(m.align),
                        predictor=copy.deepcopy(m.predictor), diffusion=copy.deepcopy(m.diffusion))


def stage2_config(cfg: Config, stage1_state: dict | None = None) -> Stage2ModelConfig:
    """The Stage-2 model's own config, from the run config.

    ``pos_frames`` (the time rows the learnable position tables store under
    ``model.stage2.pos_resample=per_forward``) is read from the Stage-1 checkpoint itself, the
    shape of its ``encoder.pos.table``: the run config does not say the Stage-1 run's frame count,
    and the checkpoint is the one source that every start of the run, a resume included, has
    (Stage 2 loads it before DeepSpeed resumes), so a resumed run rebuilds the same parameter
    shapes. ``stage1_state``: that checkpoint already loaded (the step's: read once); else only the
    table's shape is read (:func:`ivfast.checkpoint_io.tensor_shape`), and a path that does not
    exist gives 0 (the clip's frames; loading it fails later anyway). ``at_load`` or fixed (sincos)
    tables give 0.
    """
    from ivfast.checkpoint_io import tensor_shape

    m, s2 = cfg.model, cfg.model.stage2
    key, num_cls = "encoder.pos.table", m.encoder.num_cls_tokens
    grid_hw = (cfg.data.img_size // m.encoder.patch_size) ** 2
    pos_frames, shape = 0, None
    if s2.pos_resample == "per_forward" and m.encoder.pos_learnable:
        if stage1_state is not None:
            shape = tuple(stage1_state[key].shape) if key in stage1_state else None
        elif s2.init_checkpoint and os.path.exists(s2.init_checkpoint):
            try:
                shape = tensor_shape(s2.init_checkpoint, key)
            except Exception as e:  # CheckpointError, an unreadable file (safetensors has its own errors)
                raise ConfigError(f"config error: model.stage2.init_checkpoint = {s2.init_checkpoint!r}: cannot "
                                  f"read its {key} for model.stage2.pos_resample=per_forward "
                                  f"({str(e).splitlines()[0]})") from None
    if shape is not None:  # no table: load_stage1 names the missing key
        try:
            pos_frames = table_time_rows(shape, num_cls, grid_hw)
        except ValueError:
            raise ConfigError(f"config error: model.stage2.init_checkpoint = {s2.init_checkpoint!r}: its {key} "
                              f"{list(shape)} is not {num_cls} CLS rows + t x {grid_hw} patch rows "
                              "(model.encoder.num_cls_tokens, data.img_size / patch_size as in Stage 1?)") from None
    return Stage2ModelConfig(num_frames=cfg.data.num_frames, img_size=cfg.data.img_size,
                             encoder=copy.deepcopy(m.encoder), predictor=copy.deepcopy(m.predictor),
                             pos_resample=s2.pos_resample, pos_frames=pos_frames)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- validation


def _check(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"config error: {key} = {value!r}: {why}")


def validate(cfg: Config) -> None:
    m, e, t, d, tr = cfg.model, cfg.model.encoder, cfg.model.teacher, cfg.data, cfg.train
    _check(0.0 < m.mask_ratio < 1.0, "model.mask_ratio", m.mask_ratio, "must be in (0, 1)")
    _check(len(m.loss_weights) == 3, "model.loss_weights", m.loss_weights, "needs 3 weights (layers, final, recon)")
    _check(e.patch_size > 0, "model.encoder.patch_size", e.patch_size, "must be positive")
    _check(d.img_size % e.patch_size == 0, "data.img_size", d.img_size,
           f"must be a multiple of model.encoder.patch_size ({e.patch_size})")
    _check(e.tubelet_size > 0, "model.encoder.tubelet_size", e.tubelet_size, "must be positive")
    _check(d.num_frames > 0 and d.num_frames % e.tubelet_size == 0, "data.num_frames", d.num_frames,
           f"must be a positive multiple of model.encoder.tubelet_size ({e.tubelet_size})")
    for name, width, heads in (("model.encoder", e.width, e.heads), ("model.teacher", t.width, t.heads),
                               ("model.predictor", m.predictor.width, m.predictor.heads),
                               ("model.align", e.width, m.align.pool_heads)):
        key = "pool_heads" if name == "model.align" else "heads"
        _check(heads > 0 and width % heads == 0, f"{name}.{key}", heads,
               f"must divide the width ({width})")
    _check(e.width % 16 == 0, "model.encoder.width", e.width, "must be a multiple of 16 (3D sine-cosine position embedding)")
    _check(e.tubelet_size == 1, "model.encoder.tubelet_size", e.tubelet_size,
           "Stage-1 alignment pairs each student token with one teacher patch of one frame: only 1 is supported")
    _check(e.depth > 0, "model.encoder.depth", e.depth, "must be positive")
    _check(0.0 <= e.drop_path < 1.0, "model.encoder.drop_path", e.drop_path, "must be in [0, 1)")
    _check(e.num_cls_tokens >= 0, "model.encoder.num_cls_tokens", e.num_cls_tokens, "must be >= 0")
    _check(1 <= m.align.num_layers <= min(e.depth, t.depth), "model.align.num_layers", m.align.num_layers,
           f"must be in [1, min(encoder depth, teacher depth)] = [1, {min(e.depth, t.depth)}]")
    _check(not t.weights or t.weights.endswith((".safetensors", ".json")) or os.path.isdir(t.weights),
           "model.teacher.weights", t.weights, "must be a local .safetensors file (or its index / directory)")
    pw = m.predictor.init_weights
    _check(not pw or pw.endswith((".safetensors", ".json")) or os.path.isdir(pw),
           "model.predictor.init_weights", pw, "must be a local .safetensors file (or its index / directory)")
    _check(t.img_size % t.patch_size == 0, "model.teacher.img_size", t.img_size,
           f"must be a multiple of model.teacher.patch_size ({t.patch_size})")
    student_grid = d.img_size // e.patch_size
    _check(t.img_size // t.patch_size == student_grid, "model.teacher.img_size", t.img_size,
           f"teacher grid {t.img_size // t.patch_size} must equal the student grid {student_grid} "
           f"(data.img_size / patch)")
    _check(m.diffusion.batch_mul >= 1, "model.diffusion.batch_mul", m.diffusion.batch_mul, "must be >= 1")
    _check(m.diffusion.num_timesteps >= 2, "model.diffusion.num_timesteps", m.diffusion.num_timesteps, "must be >= 2")
    _check(0.0 < m.diffusion.reconstruction_ratio <= 1.0, "model.diffusion.reconstruction_ratio",
           m.diffusion.reconstruction_ratio, "must be in (0, 1]")
    _check(m.diffusion.chunk_rows >= 0, "model.diffusion.chunk_rows", m.diffusion.chunk_rows,
           "must be >= 0 (0: no chunking)")
    _check(all(c in CHECKPOINTABLE for c in m.checkpointing) and len(set(m.checkpointing)) == len(m.checkpointing),
           "model.checkpointing", m.checkpointing, f"must be distinct names from {list(CHECKPOINTABLE)}")
    _check(m.predictor.window >= 2, "model.predictor.window", m.predictor.window, "must be >= 2")
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _check(0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction", d.max_bad_fraction, "must be in [0, 1]")
    _check(d.source != "list" or bool(d.list_file), "data.list_file", d.list_file, "is required when data.source is 'list'")
    _check(all(0 < s <= 1 for s in d.scales) and len(d.scales) > 0, "data.scales", d.scales, "must be in (0, 1]")
    _check(d.synthetic_clips >= 1, "data.synthetic_clips", d.synthetic_clips, "must be >= 1")
    _check(d.backend not in ("pyav", "dali") or d.source == "list" or (d.backend, d.source) == ("pyav", "shards"),
           "data.backend", d.backend, f"reads a data list: needs data.source 'list' (data.source is {d.source!r})"
           + (" (shards are read by the pyav backend)" if d.source == "shards" else ""))
    _check(d.source != "shards" or bool(d.shards), "data.shards", d.shards,
           "is required when data.source is 'shards' (a brace pattern or a list of paths)")
    _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", d.shuffle_buffer, "must be >= 0 (0: no buffer shuffle)")
    _check(d.backend != "synthetic" or d.source == "synthetic", "data.backend", d.backend,
           f"generates clips: needs data.source 'synthetic' (data.source is {d.source!r})")
    _check(d.min_frames >= 1, "data.min_frames", d.min_frames, "must be >= 1")
    _check(d.decode_timeout_s >= 0, "data.decode_timeout_s", d.decode_timeout_s, "must be >= 0 (0: no limit)")
    from ivfast.data.config import frame_template_error  # data.frame_template
    _check(frame_template_error(d.frame_template) is None, "data.frame_template", d.frame_template,
           str(frame_template_error(d.frame_template)))
    _check(d.dali_threads >= 1, "data.dali_threads", d.dali_threads, "must be >= 1")
    _check(d.dali_prefetch >= 1, "data.dali_prefetch", d.dali_prefetch, "must be >= 1")
    _check(tr.max_steps >= 0, "train.max_steps", tr.max_steps, "must be >= 0 (0: derive from train.epochs)")
    _check(tr.max_steps > 0 or tr.epochs > 0, "train.epochs", tr.epochs, "must be positive when train.max_steps is 0")
    _check(tr.lr > 0, "train.lr", tr.lr, "must be positive")
    _check(0 <= tr.min_lr <= tr.lr, "train.min_lr", tr.min_lr, "must be in [0, train.lr]")
    _check(0 <= tr.warmup_lr <= tr.lr, "train.warmup_lr", tr.warmup_lr, "must be in [0, train.lr]")
    _check(len(tr.betas) == 2 and all(0 <= b < 1 for b in tr.betas), "train.betas", tr.betas, "must be two values in [0, 1)")
    _check(tr.eps > 0, "train.eps", tr.eps, "must be positive")
    _check(tr.weight_decay >= 0, "train.weight_decay", tr.weight_decay, "must be >= 0")
    _check(tr.clip_grad >= 0, "train.clip_grad", tr.clip_grad, "must be >= 0 (0: no clipping)")
    _check(tr.grad_accum >= 1, "train.grad_accum", tr.grad_accum, "must be >= 1")
    _check(tr.warmup_steps >= 0 and tr.warmup_epochs >= 0, "train.warmup_steps", tr.warmup_steps, "must be >= 0")
    _check(tr.log_every >= 1, "train.log_every", tr.log_every, "must be >= 1")
    _check(tr.save_every >= 1, "train.save_every", tr.save_every, "must be >= 1")
    _check(tr.keep_checkpoints >= 1, "train.keep_checkpoints", tr.keep_checkpoints, "must be >= 1")
    _check(not tr.allocator or all(":" in kv and not any(c.isspace() for c in kv) for kv in tr.allocator.split(",")),
           "train.allocator", tr.allocator, "must be PyTorch allocator settings 'key:value[,key:value...]' "
           "(e.g. expandable_segments:True)")
    _check(len(set(tr.loggers)) == len(tr.loggers), "train.loggers", tr.loggers, "must not repeat a logger")
    for name in tr.loggers:
        package = LOGGER_PACKAGES.get(name)
        _check(package is None or importlib.util.find_spec(package) is not None, "train.loggers", tr.loggers,
               f"'{name}' needs the {package} package: pip install -e '.[{name}]'")
    _check(not tr.profile or (len(tr.profile) == 2 and tr.profile[0] >= 1 and tr.profile[1] >= 1), "train.profile",
           tr.profile, "must be [start step >= 1, number of steps >= 1], or [] (off)")
    _check(0 <= cfg.deepspeed.zero_stage <= 3, "deepspeed.zero_stage", cfg.deepspeed.zero_stage, "must be 0, 1, 2 or 3")
    _check(bool(cfg.output_dir), "output_dir", cfg.output_dir, "must not be empty")
    s2 = m.stage2
    if m.stage == 2:
        _check(bool(s2.init_checkpoint), "model.stage2.init_checkpoint", s2.init_checkpoint,
               "is required for Stage 2 (a Stage-1 checkpoints dir, tag dir or consolidated .safetensors)")
    _check(0.0 < s2.teacher_momentum <= 1.0, "model.stage2.teacher_momentum", s2.teacher_momentum,
           "must be in (0, 1] (1: a frozen copy of the Stage-1 encoder; < 1: EMA)")
    _check(s2.teacher_momentum == 1.0 or cfg.deepspeed.zero_stage < 3, "model.stage2.teacher_momentum",
           s2.teacher_momentum, "an EMA teacher (< 1) needs deepspeed.zero_stage 0-2")
    for key, scale in (("small_scale", s2.small_scale), ("large_scale", s2.large_scale)):
        _check(0.0 < scale < 1.0, f"model.stage2.{key}", scale, "must be in (0, 1)")
    _check(s2.small_blocks >= 1 and s2.large_blocks >= 1, "model.stage2.small_blocks", s2.small_blocks,
           "both block counts must be >= 1")
    _check(0 < s2.aspect_min <= s2.aspect_max, "model.stage2.aspect_min", s2.aspect_min,
           "must be positive and <= model.stage2.aspect_max")
    _check(s2.max_visible >= 0, "model.stage2.max_visible", s2.max_visible, "must be >= 0 (0: no cap)")
