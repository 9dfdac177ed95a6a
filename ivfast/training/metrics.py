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


def _clean(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (rank 0 only), flushed each line."""

    def __init__(self, path: str, enabled: bool):
        self.enabled = enabled
        self._f = open(path, "a", buffering=1) if enabled else None

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

    def update(self, n: int, postfix: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                 refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
