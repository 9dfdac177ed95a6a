"""The ``data:`` section of the run config: what the loaders read and how."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal


@dataclass
class DataConfig:
    source: Literal["synthetic", "list"] = "synthetic"
    list_file: str = ""
    root: str = ""
    num_frames: int = 16
    img_size: int = 224
    scales: List[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.66])
    flip: bool = True
    synthetic_clips: int = 1024
    batch_size: int = 16
    num_workers: int = 2
    max_bad_fraction: float = 0.5
    backend: Literal["auto", "dali", "pyav", "synthetic"] = "auto"
    list_format: Literal["auto", "release", "plain", "csv"] = "auto"
    check_files: bool = True
    min_frames: int = 4  # a video with fewer decodable frames is too short: skipped and counted
    decode_timeout_s: float = 60.0
    dali_threads: int = 4
    dali_prefetch: int = 2
