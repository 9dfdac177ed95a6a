"""Activation checkpointing, applied to a built model from outside its modules.

:func:`apply_activation_checkpointing` gives every block of the named parts a class whose call
runs the block under ``torch.utils.checkpoint`` (non-reentrant) while autograd records: the
block keeps only its inputs for backward and runs its forward again there. The recomputation
goes through the module call itself, so module hooks (DeepSpeed ZeRO-3's parameter gathering)
run in it too, and it restores the RNG state of the first forward (drop-path draws the same
masks twice). Parameter names and the module tree do not change (no wrapper modules), so
checkpoints load either way. Outside autograd (no_grad, frozen teachers, probes) a block just runs.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.utils.checkpoint

# What each ``model.checkpointing`` name recomputes: the ModuleLists whose children are blocks.
BLOCK_LISTS = {
    "encoder": "encoder.blocks",  # the student encoder (never Stage 2's teacher)
    "predictor": "predictor.layers",
    "diffusion": "diffloss.net.res_blocks",
}

# Looked up at call time, so that tests can wrap it to see what a checkpoint keeps.
_checkpoint = torch.utils.checkpoint.checkpoint
_classes: dict[type, type] = {}


def _checkpointed_call(self, *args, **kwargs):
    if torch.is_grad_enabled():
        return _checkpoint(nn.Module.__call__, self, *args, use_reentrant=False, **kwargs)
    return nn.Module.__call__(self, *args, **kwargs)


def _checkpointed_class(cls: type) -> type:
    if getattr(cls, "_ivfast_checkpointed", False):
        return cls
    if cls not in _classes:
        _classes[cls] = type(f"Checkpointed{cls.__name__}", (cls,),
                             {"__call__": _checkpointed_call, "_ivfast_checkpointed": True,
                              "__module__": cls.__module__, "__qualname__": f"Checkpointed{cls.__qualname__}"})
    return _classes[cls]


def checkpoint_module(module: nn.Module) -> None:
    """Make calls of ``module`` run under activation checkpointing (in place)."""
    module.__class__ = _checkpointed_class(type(module))


def is_checkpointed(module: nn.Module) -> bool:
    return getattr(type(module), "_ivfast_checkpointed", False)


def apply_activation_checkpointing(model: nn.Module, parts: Iterable[str]) -> list[str]:
    """Checkpoint every block of each named part of ``model`` (names of :data:`BLOCK_LISTS`); a
    part the model does not have is skipped. Returns the block lists that were checkpointed."""
    done = []
    for name in parts:
        if name not in BLOCK_LISTS:
            raise ValueError(f"cannot checkpoint {name!r}: choose from {list(BLOCK_LISTS)}")
        try:
            blocks = model.get_submodule(BLOCK_LISTS[name])
        except AttributeError:
            continue
        for block in blocks:
            checkpoint_module(block)
        done.append(BLOCK_LISTS[name])
    return done
