"""Bytes saved for backward, measured: the CPU check of the analytic activation formulas.

:func:`saved_bytes` runs a callable inside ``torch.autograd.graph.saved_tensors_hooks`` and
sums, once per storage (``untyped_storage().data_ptr()``), the storage sizes of the tensors
autograd keeps for backward. Parameter storages (static memory, not activations) and any
``exclude`` storages are left out; a saved view counts its whole storage, because the view
keeps it alive. :func:`measure_stage1` does this for one forward of the real
``Stage1Model`` per component (forward hooks attribute each saved tensor to the component
whose forward is running), on the CPU at small sizes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn


@dataclass
class SavedBytes:
    """``total``: deduplicated saved bytes; ``by_component``: the same split by component
    (a storage counts for the component that first saved it); ``tensors``: the saved tensors'
    own sizes (numel x element size), each save counted, views by their elements: ``tensors``
    below ``total`` means saved views keep larger storages alive."""

    total: int = 0
    by_component: dict[str, int] = field(default_factory=dict)
    tensors: int = 0


class _Recorder:
    def __init__(self, skip: set):
        self.skip = skip
        self.seen: dict[int, int] = {}
        self.stack: list[str] = ["other"]
        self.result = SavedBytes()

    def pack(self, t: torch.Tensor):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr and ptr not in self.skip:
            self.result.tensors += t.numel() * t.element_size()
        if ptr and ptr not in self.skip and ptr not in self.seen:
            self.seen[ptr] = s.nbytes()
            comp = self.stack[-1]
            self.result.total += s.nbytes()
            self.result.by_component[comp] = self.result.by_component.get(comp, 0) + s.nbytes()
        return t

    @staticmethod
    def unpack(t):
        return t


def _storage_ptrs(tensors: Iterable[torch.Tensor]) -> set:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


def saved_bytes(fn: Callable[[], object], params: Iterable[torch.Tensor] = (), exclude: Iterable[torch.Tensor] = (),
                components: dict[str, nn.Module] | None = None) -> tuple[SavedBytes, object]:
    """Run ``fn()`` and measure what autograd saved; returns (SavedBytes, fn's result).

    ``components``: name -> module; a tensor saved while that module's forward runs is
    attributed to it (innermost wins), anything else to ``"other"``.
    """
    with _recording(_storage_ptrs(params) | _storage_ptrs(exclude), components or {}) as rec:
        out = fn()
    return rec.result, out


@contextlib.contextmanager
def _recording(skip: set, components: dict[str, nn.Module]):
    """A :class:`_Recorder` on every tensor autograd saves in the block, attributing it to the
    innermost of ``components`` whose forward is running."""
    rec = _Recorder(skip)
    handles = []
    for name, mod in components.items():
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: rec.stack.append(n) and None))
        handles.append(mod.register_forward_hook(lambda m, a, o: rec.stack.pop() and None))
    try:
        with torch.autograd.graph.saved_tensors_hooks(rec.pack, rec.unpack):
            yield rec
    finally:
        for h in handles:
            h.remove()


def _wrap_method(obj, name: str, label: str, rec: "_Recorder") -> None:
    """Attribute what ``obj.name(...)`` saves to ``label`` (an instance attribute shadows the method)."""
    fn = getattr(obj, name)

    def wrapped(*args, **kwargs):
        rec.stack.append(label)
        try:
            return fn(*args, **kwargs)
        finally:
            rec.stack.pop()

    setattr(obj, name, wrapped)


def measure_stage1(cfg, dtype: torch.dtype = torch.float32, attention: str = "math", seed: int = 0) -> SavedBytes:
    """One training-mode forward of the trainer's Stage-1 step on its DeepSpeed engine, on the
    CPU (random video, the real teacher for targets and the mask, ``cfg``'s op switches, the
    engine in ``dtype``); saved bytes per component.

    ``attention`` selects the student's backend (``math`` or ``sdpa``); the teacher runs ``math``.
    Teacher outputs and the video are inputs (excluded); the alignment work counts as ``align heads``.
    """
    from ivfast.config import with_overrides
    from ivfast.ops.attention import use_backend
    from ivfast.rng import SampleRNG
    from ivfast.training.engine import build_engine, init_runtime
    from ivfast.training.step import Stage1Step

    precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    cfg = with_overrides(cfg, [f"train.precision={precision}", "train.device=cpu"])
    rt = init_runtime(cfg)
    torch.manual_seed(seed)
    step = Stage1Step(cfg)
    engine = build_engine(cfg, step, rt)
    model = engine.module
    d = cfg.data
    video = torch.randn(d.batch_size, 3, d.num_frames, d.img_size, d.img_size)
    rng = SampleRNG.for_step(seed, 0, list(range(d.batch_size)), rt.device)
    with use_backend("math"):
        inputs = step.prepare(video, rng)
    mods = {"encoder": model.encoder}
    if hasattr(model, "predictor"):
        mods["predictor"] = model.predictor
    with use_backend(attention), _recording(_storage_ptrs(model.parameters()) | _storage_ptrs(inputs), mods) as rec:
        # the alignment losses (heads, pool, final head) and the recon loss (linear or diffusion
        # head with its loss) are methods, not modules
        _wrap_method(model, "align_losses", "align heads", rec)
        _wrap_method(model, "recon_loss", "linear head" if cfg.model.recon == "linear" else "diffusion head", rec)
        engine(*inputs)
    return rec.result
