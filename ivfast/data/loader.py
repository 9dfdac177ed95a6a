"""The rank-sharded, resumable batch order, and the loader that serves it from the configured backend."""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
from torch.utils.data import DataLoader, Sampler

from ivfast.data.collate import collate_skip_bad
from ivfast.data.config import DataConfig
from ivfast.rng import mix64

logger = logging.getLogger("ivfast.data")


class ShardedBatchSampler(Sampler):
    """Batches of dataset keys ``(index, sample_seed)`` for one rank.

    Epoch e is the permutation of the dataset seeded by (seed, e). Global batch g of it is
    the slice [g * B * world, (g + 1) * B * world), and rank r takes its r-th contiguous
    part of B samples; the sample seed is ``mix64(seed, e, index)``. So a global batch is
    the same samples with the same augmentation seeds whatever the number of ranks, and a
    run resumed at (epoch, batch) continues exactly where it stopped.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world: int, seed: int):
        if num_samples < batch_size * world:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch "
                f"({batch_size} x {world} ranks)"
            )
        self.num_samples, self.batch_size, self.rank, self.world, self.seed = num_samples, batch_size, rank, world, seed
        self.epoch, self.start_batch = 0, 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def __len__(self) -> int:
        """Global batches per epoch (the last partial one is dropped)."""
        return self.num_samples // self.global_batch

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __iter__(self):
        order = self.epoch_order(self.epoch)
        for g in range(self.start_batch, len(self)):
            lo = g * self.global_batch + self.rank * self.batch_size
            idx = order[lo: lo + self.batch_size]
            yield [(int(i), mix64(self.seed, self.epoch, int(i))) for i in idx]


def resolve_backend(d: DataConfig) -> str:
    """The backend ``d`` runs: ``synthetic``, ``pyav`` or ``dali``.

    ``auto``: generated clips for ``source: synthetic``; for a list, DALI when a GPU is
    present and ``nvidia.dali`` imports, else PyAV. (The run config rejects a backend that
    contradicts ``source``.)
    """
    if d.backend != "auto":
        return d.backend
    if d.source == "synthetic":
        return "synthetic"
    if d.source == "shards":
        return "pyav"
    return "dali" if _dali_usable() else "pyav"


def _dali_usable() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def build_dataset(d: DataConfig):
    """``SyntheticClips``, or a ``VideoListDataset`` over the list's entries (the DALI backend
    reads them from it too).

    With ``d.check_files`` the files are checked for existence and one summary line is
    logged; missing files stay in the list (each is a bad sample, counted when met), but a
    list with no existing file is an error. Malformed list lines are kept as bad samples
    (skipped, warned about with their file and line, counted). Folders of frames and
    fsspec URLs are read by the PyAV backend only: ``backend: auto`` then resolves to
    ``pyav`` (``d.backend`` is set so), an explicit ``dali`` is an error.
    """
    backend = resolve_backend(d)
    if backend == "synthetic":
        from ivfast.data.synthetic import SyntheticClips

        return SyntheticClips(num_clips=d.synthetic_clips, num_frames=d.num_frames, size=d.img_size)
    if d.source == "shards":  # webdataset-style tar shards: ivfast/data/shards.py
        from ivfast.data.shards import ShardDataset, expand_shards, index_shards

        paths = expand_shards(d.shards)
        counts = index_shards(paths, d.shard_index)
        logger.info("data (shards): %d shards, %d samples", len(paths), sum(counts))
        return ShardDataset(paths, counts, num_frames=d.num_frames, size=d.img_size, scales=tuple(d.scales),
                            flip=d.flip, decode_timeout_s=d.decode_timeout_s, min_frames=d.min_frames)
    from ivfast.data.fs import is_url
    from ivfast.data.lists import check_files, files_summary, read_list
    from ivfast.data.video_list import VideoListDataset

    entries = read_list(d.list_file, d.root, d.list_format, bad_lines="keep")
    if not entries:
        raise ValueError(f"{d.list_file} names no videos")
    odd = next((e for e in entries if e.frames or is_url(e.path)), None)
    if backend == "dali" and odd is not None:
        what = f"a folder of frames ({odd.path})" if odd.frames else f"a URL ({odd.path})"
        if d.backend == "dali":
            raise ValueError(f"data.backend dali reads local video files; {d.list_file} names {what}: "
                             f"set data.backend: pyav")
        logger.info("data: %s names %s; reading it with the PyAV backend", d.list_file, what)
        d.backend = backend = "pyav"
    if d.check_files:
        found, missing = check_files(entries)
        logger.info("data (%s): %s", backend, files_summary(d.list_file, found, missing))
        if not found:
            raise FileNotFoundError(f"none of the {len(entries)} videos of {d.list_file} exists "
                                    f"(first: {entries[0].path}); check data.root")
    return VideoListDataset(entries, num_frames=d.num_frames, size=d.img_size, scales=tuple(d.scales),
                            flip=d.flip, train=True, decode_timeout_s=d.decode_timeout_s, min_frames=d.min_frames,
                            frame_template=d.frame_template)


def build_loader(d: DataConfig, dataset, *, rank: int, world: int, seed: int, pin_memory: bool, dtype=None):
    """``(loader, sampler)``: the batches (``collate_skip_bad``'s dict) of ``dataset`` for this rank.

    ``seed`` is the run seed (epoch order and sample seeds). PyAV and synthetic: a
    DataLoader with ``d.num_workers`` persistent worker processes (each opens its own
    decoders), 4 batches prefetched per worker. DALI: ``DaliVideoLoader`` over the
    dataset's entries with the same sampler and augmentation draws, the video already on
    this rank's GPU in ``dtype`` (the training dtype; float32 when None). Shards
    (``d.source == "shards"``): the sampler is a ``shards.ShardPlan`` (same ``len`` and
    ``set_position``) and the workers, started afresh by each ``iter(loader)``, yield whole
    batches in its order.
    """
    if d.source == "shards":  # the dataset yields whole batches in the plan's order; see shards.py
        from ivfast.data.shards import ShardPlan, keep_batch

        plan = dataset.plan = ShardPlan(dataset.counts, d.batch_size, rank, world, seed, d.shuffle_buffer)
        # Fresh workers at each iter(): they take the plan's position (epoch, batch) with them.
        loader = DataLoader(dataset, batch_size=None, num_workers=d.num_workers, collate_fn=keep_batch,
                            pin_memory=pin_memory, persistent_workers=False,
                            prefetch_factor=4 if d.num_workers > 0 else None)
        return loader, plan
    sampler = ShardedBatchSampler(len(dataset), d.batch_size, rank, world, seed)
    if resolve_backend(d) == "dali":
        import torch

        from ivfast.data.dali_loader import DaliVideoLoader

        entries = list(dataset.entries) if d.flip else [replace(e, flip=False) for e in dataset.entries]
        loader = DaliVideoLoader(entries,
                                 sampler, num_frames=d.num_frames, size=d.img_size, scales=tuple(d.scales),
                                 mean=dataset.mean, std=dataset.std, device="gpu",
                                 device_id=torch.cuda.current_device(), dtype=dtype or torch.float32,
                                 num_threads=d.dali_threads, prefetch=d.dali_prefetch, min_frames=d.min_frames)
        return loader, sampler
    workers = d.num_workers
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skip_bad,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    return loader, sampler
