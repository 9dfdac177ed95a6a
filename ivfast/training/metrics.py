"""metrics.jsonl writer, rank-0 progress bar and peak-memory reading."""
from __future__ import annotations

import json
import math
import resource
import sys

import torch


def peak_memory_mb(device: torch.device) -> dict:
    """Peak memory since the last reset: GPU allocator peak on CUDA, process max RSS on CPU."""
    if device.type == "cuda":
        return {
            "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
        }
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mem_mb": rss_kb / 1024}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak (CUDA: the allocator's; the CPU's max RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _g(v, fmt: str):
    return None if v is None else format(v, fmt)


def compact(record: dict) -> dict:
    """The progress bar's fields of a log record: loss, lr, grad norm, clips/s, TFLOP/s and MFU
    (when known), data share, peak memory."""
    mem = record.get("peak_mem_mb")
    fields = {
        "loss": _g(record.get("loss"), ".4g"),
        "lr": _g(record.get("lr"), ".3g"),
        "gn": _g(record.get("grad_norm"), ".3g"),
        "clips/s": _g(record.get("clips_per_s"), ".3g"),
        "TFLOP/s": _g(record.get("tflops"), ".3g"),
        "mfu": None if record.get("mfu") is None else f"{100 * record['mfu']:.1f}%",
        "data": None if record.get("data_share") is None else f"{100 * record['data_share']:.0f}%",
        "mem": None if mem is None else f"{mem / 1024:.1f}G",
    }
    return {k: v for k, v in fields.items() if v is not None}


def _clean(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl``, flushed each line (the
    caller makes it on rank 0 only)."""

    def __init__(self, path: str):
        self._f = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class Progress:
    """A tqdm bar on rank 0 (plain lines when stdout is not a terminal), silent elsewhere."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stdout, mininterval=0.5 if sys.stdout.isatty() else 5.0)

    def update(self, n: int, record: dict) -> None:
        """Advance ``n`` steps; the postfix shows the record's :func:`compact` fields."""
        if self.bar is not None:
            self.bar.set_postfix(compact(record), refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
