"""Peak GPU memory per phase of a training step (teacher, encoder, predictor, losses, backward, step).

A phase is a ``with tracker.phase(name):`` block or the forward of a watched module. The
peak of allocated memory is reset when a phase starts and read when it ends; nested phases
fold their peaks into every phase still open, so each phase reports the true maximum over
its whole span. The tracker only works while ``active`` (the trainer turns it on, on CUDA,
for steps that get logged); otherwise every call is a cheap no-op. The statistics come from
``torch.cuda`` unless a provider is injected (tests).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class StatsProvider:
    """``reset()`` restarts the peak, ``peak()`` returns the bytes allocated at most since."""

    reset: Callable[[], None]
    peak: Callable[[], int]

    @classmethod
    def cuda(cls, device: torch.device) -> "StatsProvider":
        return cls(lambda: torch.cuda.reset_peak_memory_stats(device), lambda: torch.cuda.max_memory_allocated(device))


class PhaseTracker:
    def __init__(self, stats: StatsProvider | None = None, active: bool = False):
        self.stats = stats
        self.active = bool(active) and stats is not None
        self.peaks: dict[str, int] = {}
        self._open: list[str] = []
        self._handles = []

    @classmethod
    def for_device(cls, device: torch.device) -> "PhaseTracker":
        """A tracker reading torch.cuda statistics on a CUDA device; inert elsewhere."""
        return cls(StatsProvider.cuda(device) if device.type == "cuda" else None)

    def set_active(self, flag: bool) -> None:
        self.active = bool(flag) and self.stats is not None

    def _fold(self) -> None:
        peak = self.stats.peak()
        for name in self._open:
            self.peaks[name] = max(self.peaks.get(name, 0), peak)

    def enter(self, name: str) -> None:
        if not self.active:
            return
        if self._open:
            self._fold()
        self._open.append(name)
        self.stats.reset()

    def exit(self, name: str) -> None:
        if not self.active or not self._open or self._open[-1] != name:
            return
        self._fold()
        self._open.pop()

    @contextlib.contextmanager
    def phase(self, name: str):
        self.enter(name)
        try:
            yield
        finally:
            self.exit(name)

    def watch(self, module: torch.nn.Module, name: str) -> None:
        """Make ``module``'s forward a phase named ``name``."""
        self._handles.append(module.register_forward_pre_hook(lambda m, a: self.enter(name)))
        self._handles.append(module.register_forward_hook(lambda m, a, o: self.exit(name)))

    def unwatch(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def record(self, clear: bool = True) -> dict:
        """``{"mem_<phase>_mb": peak MiB}`` for the phases seen since the last record."""
        out = {f"mem_{name.replace(' ', '_')}_mb": v / 2**20 for name, v in self.peaks.items()}
        if clear:
            self.peaks = {}
        return out


def phase(tracker: PhaseTracker | None, name: str):
    """``tracker.phase(name)``, or nothing when there is no tracker."""
    return tracker.phase(name) if tracker is not None else contextlib.nullcontext()


def watch_stage1(tracker: PhaseTracker, model) -> None:
    """Phases for the parts of a ``Stage1Model``: encoder, predictor, linear / diffusion head."""
    for attr, name in (("encoder", "encoder"), ("predictor", "predictor"), ("recon_head", "recon head"),
                       ("diffloss", "diffusion head")):
        if hasattr(model, attr):
            tracker.watch(getattr(model, attr), name)
