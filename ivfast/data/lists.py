"""Dataset list files: which videos a run reads, with their labels and per-video options.

(Parsing of the list formats is being written; ``VideoEntry`` is the shared record.)
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VideoEntry:
    """One video of a dataset list.

    ``path``: absolute, or already joined to the data root. ``label``: integer class (0
    when the list has none). ``flip``: whether horizontal flipping is allowed for this
    video (False for Something-Something V2, whose labels depend on left/right).
    ``start_s`` / ``end_s``: optional segment of the video in seconds to sample from.
    """

    path: str
    label: int = 0
    flip: bool = True
    start_s: float | None = None
    end_s: float | None = None
