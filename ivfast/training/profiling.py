"""``train.profile``: a torch.profiler chrome trace of chosen steps, CUDA memory snapshots, and a
snapshot when a step runs out of memory.

``train.profile: [start, n]`` profiles optimiser steps start .. start + n - 1 (the step numbers of
``metrics.jsonl``), data loading included, and writes ``<output_dir>/profile/
trace_rank<r>_steps<start>-<end>.json`` (open it in https://ui.perfetto.dev or chrome://tracing;
each step is a ``step <k>`` range). On CUDA the allocator's history is recorded over the same
steps and dumped to ``memory_rank<r>_steps<start>-<end>.pickle`` (drag it into
https://pytorch.org/memory_viz). A step that raises ``torch.OutOfMemoryError`` on CUDA writes
``oom_rank<r>_step<k>.pickle`` before the error goes on: the blocks allocated at that moment, and
their stacks when the history was being recorded (the OOM fell inside the profiled steps; set
``train.profile=[k, 1]`` to hunt an OOM at step k).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable

import torch

log = logging.getLogger("ivfast.train")

MEMORY_HISTORY_ENTRIES = 200_000


def _cuda_history(enabled: bool) -> None:
    torch.cuda.memory._record_memory_history("all" if enabled else None, max_entries=MEMORY_HISTORY_ENTRIES)


def _cuda_dump(path: str) -> None:
    torch.cuda.memory._dump_snapshot(path)


class StepProfiler:
    """Drives the profiler around the loop's optimiser steps.

    ``begin(k)`` before step k's first micro-batch is loaded, ``end(k)`` after its optimiser
    step; ``guard(k)`` around a micro-batch turns an OOM into a snapshot then re-raises it;
    ``close()`` writes a window cut short by the end of the run. ``history`` / ``dump`` are the
    CUDA memory functions (injected by tests; None: no memory snapshots, as on the CPU).
    """

    def __init__(self, out_dir: str, window: list[int] | tuple[int, int] | None, device: torch.device, rank: int = 0,
                 history: Callable[[bool], None] | None = None, dump: Callable[[str], None] | None = None):
        self.dir = os.path.join(out_dir, "profile")
        self.start, self.count = (int(window[0]), int(window[1])) if window else (0, 0)
        self.device, self.rank = device, rank
        cuda = device.type == "cuda"
        self.history = history if history is not None else (_cuda_history if cuda else None)
        self.dump = dump if dump is not None else (_cuda_dump if cuda else None)
        self.prof = None
        self.recording = False
        self.first = self.last = 0
        self.written: list[str] = []

    @property
    def last_step(self) -> int:
        return self.start + self.count - 1

    def begin(self, step: int) -> None:
        """Step ``step`` is about to start: open the window when it is the first profiled step
        (or the first step of a run resumed inside the window)."""
        if self.prof is not None or not self.count or not (self.start <= step <= self.last_step):
            return
        os.makedirs(self.dir, exist_ok=True)
        if self.history is not None:
            self.history(True)
            self.recording = True
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True, with_stack=False)
        self.prof.__enter__()
        self.first = self.last = step
        log.info("profiling steps %d-%d", step, self.last_step)

    @contextlib.contextmanager
    def step_range(self, step: int):
        """A ``step <k>`` range in the trace (nothing outside the window)."""
        if self.prof is None:
            yield
            return
        with torch.profiler.record_function(f"step {step}"):
            yield

    def end(self, step: int) -> None:
        """Step ``step``'s optimiser step is done: close the window after its last step."""
        if self.prof is None:
            return
        self.last = step
        if step >= self.last_step:
            self._finish()

    @contextlib.contextmanager
    def guard(self, step: int):
        """Run a micro-batch of step ``step``; an out-of-memory error writes a snapshot first."""
        try:
            yield
        except torch.OutOfMemoryError:
            self.oom_snapshot(step)
            raise

    def oom_snapshot(self, step: int) -> str | None:
        if self.dump is None:
            return None
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"oom_rank{self.rank}_step{step}.pickle")
        try:
            self.dump(path)
        except Exception as e:  # noqa: BLE001 - the OOM is the error to report
            log.error("out of memory at step %d; the memory snapshot failed: %s", step, e)
            return None
        self.written.append(path)
        log.error("out of memory at step %d: memory snapshot in %s%s", step, path,
                  "" if self.recording else f" (blocks only; train.profile=[{step}, 1] records their stacks)")
        return path

    def _finish(self) -> None:
        prof, self.prof = self.prof, None
        tag = f"rank{self.rank}_steps{self.first}-{self.last}"
        prof.__exit__(None, None, None)
        trace = os.path.join(self.dir, f"trace_{tag}.json")
        prof.export_chrome_trace(trace)
        self.written.append(trace)
        if self.recording:
            snap = os.path.join(self.dir, f"memory_{tag}.pickle")
            self.dump(snap)
            self.history(False)
            self.recording = False
            self.written.append(snap)
        log.info("profile of steps %d-%d written to %s", self.first, self.last, self.dir)

    def close(self) -> None:
        if self.prof is not None:
            self._finish()
