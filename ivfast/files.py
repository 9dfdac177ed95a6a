"""Files written atomically: a crash leaves the old content or the new one, never a mix (the
new content goes to a temporary file beside the target, then is renamed over it)."""
from __future__ import annotations

import os

import torch


def atomic_write_text(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves the old or the new content, never a mix.

    The text goes to a temporary file beside ``path`` that is fsynced, renamed over ``path``
    (atomic on POSIX), and the directory is fsynced so the rename itself survives a power loss.
    """
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


def save_safetensors(state: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write ``state`` to ``path`` atomically (each tensor copied: safetensors refuses shared storage)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
    tmp = f"{path}.tmp.{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
