"""What datasets and loaders exchange: sample keys in, batches of the readable samples out."""
from __future__ import annotations

import torch
from torch.utils.data import default_collate


def sample_key(key) -> tuple[int, int]:
    """A dataset key as ``(index, sample_seed)``; a plain int index means seed 0."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise TypeError(f"dataset key must be (index, seed), got {key!r}")
        return int(key[0]), int(key[1])
    return int(key), 0


def collate_skip_bad(items) -> dict:
    """Stack the readable samples of a batch; count the unreadable ones.

    ``items`` is a list of dataset outputs: dicts ``{"video": (C, T, H, W), "label": int,
    "index": int}`` or ``None`` for a sample that could not be read. Returns

        {"video": float (B', C, T, H, W), "label": int64 (B',), "index": int64 (B',),
         "num_bad": int}

    with B' the number of non-``None`` items, in their original order. When every item
    is ``None`` (or ``items`` is empty) the batch is
    ``{"video": None, "label": int64 (0,), "index": int64 (0,), "num_bad": len(items)}``:
    test ``batch["video"] is None`` to skip it.
    """
    items = list(items)
    good = [it for it in items if it is not None]
    num_bad = len(items) - len(good)
    if not good:
        empty = torch.empty(0, dtype=torch.int64)
        return {"video": None, "label": empty, "index": empty.clone(), "num_bad": num_bad}
    return {
        # default_collate stacks straight into shared memory inside a DataLoader worker,
        # which saves one copy of the batch on its way to the main process.
        "video": default_collate([torch.as_tensor(it["video"]) for it in good]),
        "label": torch.tensor([int(it["label"]) for it in good], dtype=torch.int64),
        "index": torch.tensor([int(it["index"]) for it in good], dtype=torch.int64),
        "num_bad": num_bad,
    }
