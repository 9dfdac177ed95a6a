"""Helpers of the op tests: inputs, a kernel checked against its reference (forward and every
gradient) under the tolerance rule of :func:`tests.support.assert_close_to_ref`, a stand-in for
a kernel that must not launch, the bytes an autograd graph keeps for backward, and code run
with compiled (not interpreted) kernels in a fresh interpreter."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable, Optional, Sequence

import pytest
import torch

from ivfast.memory.saved_tensors import saved_bytes as measure_saved
from ivfast.ops.dispatch import interpreting
from tests.support import ROOT, assert_close_to_ref, run_env

# Where the kernels run: compiled on a GPU, else through the interpreter on the CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")

cuda = pytest.mark.skipif(interpreting() or not torch.cuda.is_available(), reason="needs a GPU and TRITON_INTERPRET=0")


def _have_ptxas() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:  # noqa: BLE001 - no NVIDIA backend: no ptxas
        return False


needs_ptxas = pytest.mark.skipif(not _have_ptxas(), reason="no ptxas in this triton install")


def compiled_python(code: str, timeout: int = 120, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter at the repository root without TRITON_INTERPRET (the
    kernels are real JIT functions), ``env`` added to its environment."""
    extra = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=run_env(**extra), capture_output=True,
                          text=True, timeout=timeout)

# Float32 arithmetic noise allowed on top of the rule: a few float32 ulps at the values' scale
# (a different summation order where PyTorch's own error happens to be tiny, or exactly zero).
F32_ULPS = 4


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, std: float = 1.0, mean: float = 0.0,
          grad: bool = True) -> torch.Tensor:
    """A leaf on :data:`DEVICE` of N(mean, std^2) values rounded to ``dtype`` (one float32 draw per seed)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std + mean).to(DEVICE, dtype).requires_grad_(grad)


def _copy(a, dtype: Optional[torch.dtype] = None):
    """A fresh leaf with ``a``'s values and strides (floating tensors cast to ``dtype`` when given),
    keeping ``requires_grad``; anything else as it is."""
    if not isinstance(a, torch.Tensor):
        return a
    dtype = dtype if dtype is not None and a.is_floating_point() else a.dtype
    t = torch.empty_strided(a.shape, a.stride(), dtype=dtype, device=a.device).copy_(a.detach())
    return t.requires_grad_(a.requires_grad)


def _run(fn: Callable, args: Sequence, gout: Callable[[torch.Tensor], torch.Tensor]):
    """``fn(*args)`` and the gradients of the arguments that require grad for ``gout(out)``."""
    out = fn(*args)
    wanted = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if not out.requires_grad or not wanted:
        return out, [None] * len(wanted)
    return out, list(torch.autograd.grad(out, wanted, gout(out), allow_unused=True))


def _noise(*refs: Optional[torch.Tensor]) -> float:
    """:data:`F32_ULPS` float32 ulps of the largest magnitude among ``refs``."""
    scale = max([r.detach().abs().max().item() for r in refs if r is not None and r.numel()], default=0.0)
    return F32_ULPS * torch.finfo(torch.float32).eps * scale


def close(out: torch.Tensor, ref: torch.Tensor, ref_pt: torch.Tensor, atol: float = 0.0, what: str = "") -> None:
    """:func:`assert_close_to_ref` with ``atol`` plus :data:`F32_ULPS` float32 ulps of max|ref|."""
    assert_close_to_ref(out, ref, ref_pt, atol=atol + _noise(ref), what=what)


def check_op(op: Callable, ref: Callable, args: Sequence, *, truth: Optional[Callable] = None, atol: float = 0.0,
             grad_atol: Optional[float] = None, seed: int = 1234, what: str = ""):
    """``op(*args)`` against the exact reference: ``truth`` (default ``ref``) on float64 copies of
    the same values; PyTorch's own error is ``ref`` run on copies in the arguments' own dtypes.
    Compares the output and the gradient of every argument that requires grad, for one random
    output gradient, with ``atol`` (``grad_atol``) plus float32 noise at the scale of all of
    them (:data:`F32_ULPS`). Returns the kernel's output and gradients."""
    drawn = {}

    def gout(out):  # one draw, in each run's output dtype
        if "g" not in drawn:
            drawn["g"] = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
        return drawn["g"].to(out.dtype)

    out, grads = _run(op, [_copy(a) for a in args], gout)
    out_pt, grads_pt = _run(ref, [_copy(a) for a in args], gout)
    out_t, grads_t = _run(truth or ref, [_copy(a, torch.float64) for a in args], gout)
    noise = _noise(out_t, *grads_t)
    assert_close_to_ref(out, out_t, out_pt, atol=atol + noise, what=f"{what} out")
    names = [f"arg {i}" for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    for name, g, g_pt, g_t in zip(names, grads, grads_pt, grads_t):
        if g_t is None:  # no dependence: the kernel's gradient is zero or absent as well
            assert g is None or not g.any(), f"{what} d {name}: non-zero where the reference has none"
            continue
        assert g is not None, f"{what} d {name}: missing"
        g_atol = atol if grad_atol is None else grad_atol
        assert_close_to_ref(g, g_t, g_pt, atol=g_atol + noise, what=f"{what} d {name}")
    return out, grads


class NoLaunch:
    """Stands in for a Triton kernel or launcher: any launch or call fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched where the reference should serve")

    def __call__(self, *args, **kwargs):
        raise AssertionError("a kernel launcher ran where the reference should serve")


def saved_bytes(fn: Callable, exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes ``fn()`` keeps for backward (:func:`ivfast.memory.saved_tensors.saved_bytes`:
    distinct storages of the saved tensors, a saved view counting its whole storage), those of
    ``exclude`` (parameters, live inputs) not counted."""
    return measure_saved(fn, exclude=exclude)[0].total
