"""The resumable, rank-sharded batch order and the DataLoader around the datasets.

Every epoch is a permutation of the dataset seeded by (seed, epoch). Global batch g of an
epoch is the slice [g * B * world, (g + 1) * B * world) of it; rank r takes its r-th
contiguous part of B samples. A batch is therefore the same set of samples, with the same
per-sample augmentation seeds, whatever the number of ranks, and a run resumed at
(epoch, batch) continues exactly where it stopped. Datasets receive keys
``(index, sample_seed)``.

``data.backend`` picks what produces the batches (``resolve_backend``): generated clips,
PyAV in DataLoader worker processes, or NVIDIA DALI on the GPU; all three take their
samples, seeds and augmentation from the same sampler.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
from torch.utils.data import DataLoader, Sampler

from ivfast.config import Config
from ivfast.data.collate import collate_skip_bad
from ivfast.models.sample_rng import _mix

logger = logging.getLogger("ivfast.data")


class ShardedBatchSampler(Sampler):
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
            yield [(int(i), _mix(self.seed, self.epoch, int(i))) for i in idx]


def resolve_backend(d) -> str:
    """The backend that ``data`` (a ``DataConfig``) runs: ``synthetic``, ``pyav`` or ``dali``.

    ``auto``: generated clips for ``data.source: synthetic``; for a list, DALI when a GPU is
    present and ``nvidia.dali`` imports, else PyAV. (``load_config`` has already rejected a
    backend that contradicts ``data.source``.)
    """
    if d.backend != "auto":
        return d.backend
    if d.source == "synthetic":
        return "synthetic"
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


def build_dataset(cfg: Config):
    """The run's dataset: ``SyntheticClips``, or a ``VideoListDataset`` over the list's entries
    (which the DALI backend reads from too: ``build_loader`` takes them from it).

    With ``data.check_files`` the list's files are checked for existence first and one
    summary line is logged; missing files stay in the list (each is a bad sample, counted),
    but a list with no existing file is an error.
    """
    d = cfg.data
    backend = resolve_backend(d)
    if backend == "synthetic":
        from ivfast.data.synthetic import SyntheticClips

        return SyntheticClips(num_clips=d.synthetic_clips, num_frames=d.num_frames, size=d.img_size)
    from ivfast.data.lists import check_files, files_summary, read_list
    from ivfast.data.video_list import VideoListDataset

    entries = read_list(d.list_file, d.root, d.list_format)
    if not entries:
        raise ValueError(f"{d.list_file} names no videos")
    if d.check_files:
        found, missing = check_files(entries)
        logger.info("data (%s): %s", backend, files_summary(d.list_file, found, missing))
        if not found:
            raise FileNotFoundError(f"none of the {len(entries)} videos of {d.list_file} exists "
                                    f"(first: {entries[0].path}); check data.root")
    return VideoListDataset(entries, num_frames=d.num_frames, size=d.img_size, scales=tuple(d.scales),
                            flip=d.flip, train=True, decode_timeout_s=d.decode_timeout_s, min_frames=d.min_frames)


def build_loader(cfg: Config, dataset, rank: int, world: int, pin_memory: bool, dtype=None):
    """``(loader, sampler)``: an iterable of batches (``collate_skip_bad``'s dict) and its sampler.

    PyAV and synthetic: a DataLoader with ``data.num_workers`` persistent worker processes
    (each opens its own decoders), ``pin_memory``, 4 batches prefetched per worker. DALI:
    ``DaliVideoLoader`` over the dataset's entries, same sampler and augmentation, the
    video already on this rank's GPU in ``dtype`` (the training dtype; float32 when None).
    """
    sampler = ShardedBatchSampler(len(dataset), cfg.data.batch_size, rank, world, cfg.train.seed)
    d = cfg.data
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
