"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ivfast.config import TrainConfig

# Parameters whose name contains one of these never get weight decay (besides 1-D ones:
# biases, norm weights, LayerScale gammas).
NO_DECAY_NAME_PARTS = ("pos", "token", "probe")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    leaf = name.split(".")[-1]
    return param.ndim <= 1 or leaf == "bias" or any(p in name for p in NO_DECAY_NAME_PARTS)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_weight_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kwargs)


def lr_factor(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warmup, then per-step cosine to min_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = min_lr / lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate as a pure function of the optimiser step: nothing to save or restore."""

    base_lr: float
    min_lr: float
    total_steps: int
    warmup_steps: int

    def lr(self, step: int) -> float:
        return self.base_lr * lr_factor(step, self.total_steps, self.warmup_steps, self.base_lr, self.min_lr)
