"""The process's runtime (device, process group, precision, op switches) and the one DeepSpeed
engine around a step's model: what the trainer, the step benchmarks, the memory measurement
and the tests all build."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ivfast.config import Config
from ivfast.ops import dispatch
from ivfast.ops.attention import set_backend
from ivfast.training import distributed
from ivfast.training.ds_config import deepspeed_config
from ivfast.training.optim import build_optimizer, effective_lr


@dataclass
class Runtime:
    dist: distributed.DistInfo
    dtype: torch.dtype  # the training dtype: bf16 on a GPU (train.precision auto), fp32 on the CPU

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16


def init_runtime(cfg: Config) -> Runtime:
    """Start (or join) the process group and set the process-wide switches once: the ops'
    dispatch (``model.fused_kernels``, ``model.lean_saves``), the attention backend and the seed."""
    kind = distributed.choose_device(cfg.train.device)
    dist = distributed.init(kind, cfg.deepspeed.cpu_shm)
    p = cfg.train.precision
    bf16 = p == "bf16" or (p == "auto" and kind == "cuda")
    dispatch.configure(fused=cfg.model.fused_kernels, lean=cfg.model.lean_saves)
    set_backend(cfg.model.attention)
    torch.manual_seed(cfg.train.seed)
    return Runtime(dist, torch.bfloat16 if bf16 else torch.float32)


def build_engine(cfg: Config, step, rt: Runtime):
    """``step``'s frozen parts to the device, then the DeepSpeed engine (AdamW, ZeRO per
    ``deepspeed:``) around ``step.model``."""
    step.to(rt.device, rt.dtype)
    lr = effective_lr(cfg.train, cfg.data.batch_size, rt.dist.world).lr  # train.lr_scaling applied
    optimizer = build_optimizer(step.model, cfg.train, rt.device, lr=lr)
    return wrap(step.model, optimizer, deepspeed_config(cfg, rt.bf16))


def wrap(model: torch.nn.Module, optimizer, ds_config: dict):
    """The repository's one ``deepspeed.initialize``: ``model`` and ``optimizer`` in a DeepSpeed
    engine configured by the dict ``ds_config``. The process group must already exist
    (:func:`init_runtime` starts it), so DeepSpeed never starts its own."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    return engine
