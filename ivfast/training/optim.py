"""AdamW parameter groups, the effective learning rate and the warmup + cosine schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ivfast.config import TrainConfig

# ---------------------------------------------------------------------------- weight decay

# train.no_decay "all_tables": parameters whose name contains one of these never get weight
# decay (besides 1-D ones: biases, norm weights, LayerScale gammas).
NO_DECAY_NAME_PARTS = ("pos", "token", "probe")

# train.no_decay "release": the release's optim_factory.get_parameter_groups, which exempts
# 1-D parameters, names ending ".bias" and the names of the model's no_weight_decay() (an exact
# match of the full name; the same set in Stage 1 and Stage 2). That set in ivfast's names:
#   release            ivfast                 decay
#   pos_embed          encoder.pos.table      no   (skip list)
#   cls_token          encoder.cls_token      no   (skip list)
#   clip_pos_embed     align_pos.table        no   (skip list; Stage 1 only)
#   diff_pos_embed     predictor_pos.table    yes  (not in the skip list, 3-D)
#   bert_mask_token    mask_token             yes  (not in the skip list, (1, 1, C))
# (the skip list's separable pos_embed_* / clip_pos_embed_* names have no ivfast counterpart.)
RELEASE_NO_DECAY_NAMES = frozenset({"encoder.pos.table", "encoder.cls_token", "align_pos.table"})
# Parameters that ivfast keeps 1-D but the release keeps with more dimensions (and so decays):
# the release's rank, for its 1-D test.
RELEASE_NDIM = {"mask_token": 3}

NO_DECAY_RULES = ("release", "all_tables")


def no_weight_decay(name: str, param: torch.Tensor, rule: str = "release") -> bool:
    """Whether the trainable parameter ``name`` is exempt from weight decay under ``rule``
    (``train.no_decay``); ``name`` as ``named_parameters()`` of the Stage-1/2 model gives it."""
    if rule == "release":
        ndim = RELEASE_NDIM.get(name, param.ndim)
        return ndim == 1 or name.endswith(".bias") or name in RELEASE_NO_DECAY_NAMES
    if rule == "all_tables":
        leaf = name.split(".")[-1]
        return param.ndim <= 1 or leaf == "bias" or any(p in name for p in NO_DECAY_NAME_PARTS)
    raise ValueError(f"unknown no-decay rule {rule!r}: expected one of {NO_DECAY_RULES}")


def param_groups(model: torch.nn.Module, weight_decay: float, rule: str = "release") -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_weight_decay(name, p, rule) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                    lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (rule ``cfg.no_decay``); ``lr``: the initial lr (the
    effective one, :func:`effective_lr`; ``cfg.lr`` when not given). The schedule sets it per step."""
    kwargs = {"lr": cfg.lr if lr is None else lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.no_decay), **kwargs)


# ---------------------------------------------------------------------------- learning rate


@dataclass(frozen=True)
class EffectiveLR:
    """The run's learning rates after ``train.lr_scaling``."""

    lr: float
    min_lr: float
    warmup_lr: float
    global_batch: int  # clips per optimiser step: batch_size x world x grad_accum
    factor: float  # global_batch / 256 under "batch256", 1 under "none"


def effective_lr(cfg: TrainConfig, batch_size: int, world: int) -> EffectiveLR:
    """The release's linear scaling (main_stage1/2.py): under ``lr_scaling: batch256``, lr,
    min_lr and warmup_lr are given per 256 clips and multiplied by the global batch
    (``batch_size`` per rank x ``world`` ranks x ``cfg.grad_accum``) / 256; under "none"
    they are used as given. (The release's num_sample factor is 1 in all its runs; ivfast has
    no repeated sampling.)"""
    global_batch = batch_size * world * cfg.grad_accum
    if cfg.lr_scaling == "batch256":
        factor = global_batch / 256
    elif cfg.lr_scaling == "none":
        factor = 1.0
    else:
        raise ValueError(f"unknown lr scaling {cfg.lr_scaling!r}: expected 'none' or 'batch256'")
    return EffectiveLR(cfg.lr * factor, cfg.min_lr * factor, cfg.warmup_lr * factor, global_batch, factor)


def scheduled_lr(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float,
                 warmup_lr: float = 0.0) -> float:
    """The lr at optimiser step ``step`` (0-based), the release's utils.cosine_scheduler: for
    ``step < warmup_steps`` linear from ``warmup_lr`` (step 0) to ``lr`` (step warmup_steps - 1),
    then cosine from ``lr`` to ``min_lr`` over the remaining total_steps - warmup_steps steps;
    ``min_lr`` from ``total_steps`` on."""
    if warmup_steps > 0 and step < warmup_steps:
        if warmup_steps == 1:
            return warmup_lr
        return warmup_lr + (lr - warmup_lr) * step / (warmup_steps - 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate as a pure function of the optimiser step: nothing to save or restore.
    The rates are the effective ones (:func:`effective_lr`)."""

    base_lr: float
    min_lr: float
    total_steps: int
    warmup_steps: int
    warmup_lr: float = 0.0

    def lr(self, step: int) -> float:
        return scheduled_lr(step, self.total_steps, self.warmup_steps, self.base_lr, self.min_lr, self.warmup_lr)
