"""Activation checkpointing of one block: ``model.checkpointing`` names the modules that use it.

A checkpointed block keeps only its inputs for backward and runs its forward again there
(``torch.utils.checkpoint``, non-reentrant). The recomputation restores the RNG state of
the first forward (``preserve_rng_state``, the default), so the encoder's drop-path draws
the same masks twice. Callers pass the block *module* (not a function of its parameters)
so that DeepSpeed ZeRO-3's module hooks gather its parameters in the recomputation too.
Outside autograd (``no_grad``, frozen teachers, probes) a block just runs.
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint

# Looked up at call time, so that tests can wrap it to see what a checkpoint keeps.
_checkpoint = torch.utils.checkpoint.checkpoint


def run_block(block, *args, checkpoint: bool = False):
    """``block(*args)``, checkpointed when ``checkpoint`` and autograd is recording."""
    if checkpoint and torch.is_grad_enabled():
        return _checkpoint(block, *args, use_reentrant=False)
    return block(*args)
