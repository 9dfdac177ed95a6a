"""Saving DeepSpeed checkpoints atomically and loading them back into the engine.

The layout (tags, ``ivfast_state.json``, ``latest``) and resume selection live in
:mod:`ivfast.checkpoint_io`, which reads checkpoints without DeepSpeed; they are re-exported
here for the trainer.
"""
from __future__ import annotations

import json
import os
import shutil

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from ivfast import checkpoint_io
from ivfast.files import atomic_write_text
from ivfast.checkpoint_io import (
    LATEST,
    STATE_FILE,
    TAG_RE,
    complete_tags,
    find_resume,
    read_state,
    tag_for,
)

__all__ = ["LATEST", "STATE_FILE", "TAG_RE", "SafeCheckpointEngine", "atomic_write_text", "complete_tags",
           "deepspeed_classes", "find_resume", "load", "read_state", "safe_load", "save", "tag_for"]


def deepspeed_classes() -> list:
    """The real DeepSpeed classes named by :data:`ivfast.checkpoint_io.DEEPSPEED_CLASSES`."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, LossScaler, ZeroStageEnum]


def safe_load(path: str, map_location=None):
    """:func:`ivfast.checkpoint_io.safe_load` with DeepSpeed's real classes (not the stand-ins),
    as the engine needs them back: weights-only, no code from the file runs."""
    return checkpoint_io.safe_load(path, map_location, extra_globals=deepspeed_classes())


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with a weights-only loader (DeepSpeed's own
    unpickles arbitrary objects, i.e. runs code from the file)."""

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location)


def save(engine, ckpt_dir: str, step: int, state: dict, keep: int, is_rank0: bool, barrier) -> str:
    """Save ``engine`` at ``step`` with the loop ``state``; returns the tag.

    Order (what makes a kill at any point safe): every rank writes DeepSpeed's files; barrier;
    rank 0 writes the state file, then points ``latest`` at the tag, then deletes all but the
    ``keep`` newest complete tags and the incomplete ones older than this tag; barrier.
    """
    tag = tag_for(step)
    os.makedirs(ckpt_dir, exist_ok=True)
    engine.save_checkpoint(ckpt_dir, tag=tag, save_latest=False)
    barrier()
    if is_rank0:
        atomic_write_text(os.path.join(ckpt_dir, tag, STATE_FILE), json.dumps(state, indent=1))
        atomic_write_text(os.path.join(ckpt_dir, LATEST), tag)
        for old in complete_tags(ckpt_dir)[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
        _remove_incomplete(ckpt_dir, keep_tag=tag)
    barrier()
    return tag


def _remove_incomplete(ckpt_dir: str, keep_tag: str) -> None:
    """Delete directories left by saves that were killed (no state file), older than ``keep_tag``."""
    newest = int(TAG_RE.match(keep_tag).group(1))
    for t in os.listdir(ckpt_dir):
        m = TAG_RE.match(t)
        path = os.path.join(ckpt_dir, t)
        if m and int(m.group(1)) < newest and not os.path.isfile(os.path.join(path, STATE_FILE)):
            shutil.rmtree(path, ignore_errors=True)


def load(engine, ckpt_dir: str, tag: str) -> dict:
    """Load model, optimizer and LR-scheduler states into ``engine``; returns the loop state."""
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(ckpt_dir, tag)}")
    return read_state(ckpt_dir, tag)
