"""When a fused kernel runs instead of its PyTorch reference.

- CUDA tensors: the Triton kernel (unless disabled).
- CPU tensors: the reference, unless ``TRITON_INTERPRET=1`` is set in the environment before
  Triton is imported; then the kernels run through Triton's interpreter on the CPU (this is
  how the tests check kernels on a machine without a GPU).
- ``set_enabled(False)`` (or ``IVFAST_KERNELS=0``) forces the references everywhere.
"""
from __future__ import annotations

import os

import torch

_enabled = os.environ.get("IVFAST_KERNELS", "1") not in ("0", "false", "off")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = bool(flag)


def enabled() -> bool:
    return _enabled


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the fused kernel should serve a call on these tensors."""
    if not _enabled:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreting() and all(t.device.type == "cpu" for t in tensors)
