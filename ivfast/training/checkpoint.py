"""Atomic DeepSpeed checkpoints with automatic resume, loaded without unpickling code.

Layout under ``<output_dir>/checkpoints/``:
- ``step_00000100/``: what DeepSpeed's ``save_checkpoint`` writes, plus ``ivfast_state.json``
  (the loop's position: step, epoch, batch in epoch, counters), written last, once every
  rank has finished writing. A directory without it is incomplete and is never resumed.
- ``latest``: the tag of the newest complete checkpoint, replaced atomically after the
  state file exists. A kill at any point leaves ``latest`` naming a complete checkpoint.

DeepSpeed's own loader unpickles arbitrary objects; :class:`SafeCheckpointEngine` loads
with ``weights_only=True`` and allows only the few DeepSpeed classes its files hold.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

log = logging.getLogger("ivfast.checkpoint")

STATE_FILE = "ivfast_state.json"
LATEST = "latest"
_TAG_RE = re.compile(r"^step_(\d{8,})$")


def _safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, LossScaler, ZeroStageEnum]


def safe_load(path: str, map_location=None):
    """torch.load with weights_only=True, allowing the DeepSpeed classes found in its checkpoints."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with a loader that never unpickles code."""

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location)


def _fsync_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(ckpt_dir: str) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir)
            if _TAG_RE.match(t) and os.path.isfile(os.path.join(ckpt_dir, t, STATE_FILE))]
    return sorted(tags, key=lambda t: int(_TAG_RE.match(t).group(1)))


def find_resume(ckpt_dir: str) -> str | None:
    """The tag to resume from: ``latest`` if it names a complete checkpoint, else the newest complete one."""
    latest = os.path.join(ckpt_dir, LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        if tag and os.path.isfile(os.path.join(ckpt_dir, tag, STATE_FILE)):
            return tag
        log.warning("checkpoint 'latest' names %r, which is incomplete; looking for another", tag)
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def read_state(ckpt_dir: str, tag: str) -> dict:
    with open(os.path.join(ckpt_dir, tag, STATE_FILE)) as f:
        return json.load(f)


def save(engine, ckpt_dir: str, step: int, state: dict, keep: int, is_rank0: bool, barrier) -> str:
    """Save a checkpoint of ``engine`` at ``step`` with the loop ``state``; returns its tag."""
    tag = tag_for(step)
    os.makedirs(ckpt_dir, exist_ok=True)
    engine.save_checkpoint(ckpt_dir, tag=tag, save_latest=False)
    barrier()
    if is_rank0:
        _fsync_write(os.path.join(ckpt_dir, tag, STATE_FILE), json.dumps(state, indent=1))
        _fsync_write(os.path.join(ckpt_dir, LATEST), tag)
        for old in complete_tags(ckpt_dir)[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
        _remove_incomplete(ckpt_dir, keep_tag=tag)
    barrier()
    return tag


def _remove_incomplete(ckpt_dir: str, keep_tag: str) -> None:
    """Delete directories left by saves that were killed (no state file), older than the newest."""
    newest = int(_TAG_RE.match(keep_tag).group(1))
    for t in os.listdir(ckpt_dir):
        m = _TAG_RE.match(t)
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
