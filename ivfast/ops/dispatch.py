"""Which implementation an op runs, set once per process from the run config.

- ``fused`` (``model.fused_kernels``; ``IVFAST_KERNELS=0`` turns it off at import): a Triton
  kernel serves CUDA tensors, and CPU tensors when ``TRITON_INTERPRET=1`` was set before
  Triton was imported (the interpreter: how kernels are tested without a GPU). Off, every op
  runs its PyTorch reference, so no ivfast kernel launches at all.
- ``lean`` (``model.lean_saves``): the autograd Functions of :mod:`ivfast.ops.lean` (and the
  index-only token gather) keep less for backward; off, the plain composition runs. Values and
  gradients are the same either way.

:func:`configure` is called once at start (``ivfast.training.engine.init_runtime``);
:func:`override` scopes a setting for a block (tests, measurements).
"""
from __future__ import annotations

import contextlib
import os

import torch

_state = {"fused": os.environ.get("IVFAST_KERNELS", "1") not in ("0", "false", "off"), "lean": True,
          "meta": False}


def configure(*, fused: bool | None = None, lean: bool | None = None) -> None:
    """Set the process-wide switches that are given (None leaves one as it is)."""
    if fused is not None:
        _state["fused"] = bool(fused)
    if lean is not None:
        _state["lean"] = bool(lean)


@contextlib.contextmanager
def override(*, fused: bool | None = None, lean: bool | None = None):
    """``with override(fused=False): ...`` sets switches for a block and restores them after."""
    saved = dict(_state)
    configure(fused=fused, lean=lean)
    try:
        yield
    finally:
        _state.update(saved)


def fused_enabled() -> bool:
    return _state["fused"]


def lean_enabled() -> bool:
    return _state["lean"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def meta_launches(on: bool) -> bool:
    """Let ``meta`` tensors take the kernels' launchers (``ivfast.ops.launch.capture`` with a
    target sets it: launches are recorded, nothing runs); returns the previous setting."""
    previous = _state["meta"]
    _state["meta"] = bool(on)
    return previous


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when a Triton kernel serves a call on these tensors (see the module docstring)."""
    if not _state["fused"]:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    if _state["meta"] and all(t.device.type == "meta" for t in tensors):
        return True
    return interpreting() and all(t.device.type == "cpu" for t in tensors)


def lean_applies(x: torch.Tensor) -> bool:
    """Whether a lean Function serves a call on ``x``: lean is on, autograd records and autocast
    is off (under autocast a Function would see mixed dtypes in backward)."""
    return _state["lean"] and torch.is_grad_enabled() and not autocast_enabled(x.device)


def autocast_enabled(device: torch.device) -> bool:
    """``torch.is_autocast_enabled`` for ``device``'s type (False for ``meta``, which has no autocast)."""
    return device.type != "meta" and torch.is_autocast_enabled(device.type)


def autocast_off(device: torch.device):
    """A context with autocast off on ``device``'s type: ``torch.autocast(enabled=False)`` where
    it is on, else nothing (also on ``meta``, which has no autocast and whose ``torch.autocast``
    raises)."""
    if autocast_enabled(device):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
