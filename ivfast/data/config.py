"""The ``data:`` section of the run config: what the loaders read and how."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal


FRAME_TEMPLATE = "img_{:05d}.jpg"  # the frame files of a folder of frames, by default


@dataclass
class DataConfig:
    source: Literal["synthetic", "list", "shards"] = "synthetic"
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
    list_format: Literal["auto", "release", "plain", "csv", "videomae"] = "auto"
    # File names in a folder of frames (the 3-field lines' `frame_dir start total`): str.format
    # of the frame number (printf style "img_%05d.jpg" also works).
    frame_template: str = FRAME_TEMPLATE
    check_files: bool = True
    min_frames: int = 4  # a video with fewer decodable frames is too short: skipped and counted
    decode_timeout_s: float = 60.0
    dali_threads: int = 4
    dali_prefetch: int = 2
    # source: shards (ivfast/data/shards.py): webdataset-style tar shards, a brace pattern
    # ("train-{000000..000099}.tar") or a list of paths / patterns (each brace-expanded).
    shards: List[str] = field(default_factory=list)
    shuffle_buffer: int = 100  # samples held (raw bytes) per loader worker for shuffling; 0: none
    shard_index: str = ""  # a json file caching the shards' sample counts ("": count at every start)


def frame_name(template: str, number: int) -> str:
    """The file name of frame ``number``: ``template.format(number)`` (or ``template % number``
    for a printf-style template without braces)."""
    if "{" not in template and "%" in template:
        return template % number
    return template.format(number)


def frame_template_error(template: str) -> str | None:
    """Why ``template`` cannot name the frame files of a folder (None: it can)."""
    try:
        a, b = frame_name(template, 1), frame_name(template, 2)
    except (ValueError, TypeError, IndexError, KeyError) as e:
        return f"does not format a frame number ({type(e).__name__}: {e})"
    if a == b or "/" in a or "\\" in a:
        return "must put the frame number in a file name, like 'img_{:05d}.jpg'"
    return None
