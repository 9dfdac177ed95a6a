"""The resumable, rank-sharded batch order and the DataLoader around the datasets.

Every epoch is a permutation of the dataset seeded by (seed, epoch). Global batch g of an
epoch is the slice [g * B * world, (g + 1) * B * world) of it; rank r takes its r-th
contiguous part of B samples. A batch is therefore the same set of samples, with the same
per-sample augmentation seeds, whatever the number of ranks, and a run resumed at
(epoch, batch) continues exactly where it stopped. Datasets receive keys
``(index, sample_seed)``.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import DataLoader, Sampler

from ivfast.config import Config
from ivfast.data.collate import collate_skip_bad
from ivfast.models.sample_rng import _mix


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


def build_dataset(cfg: Config):
    d = cfg.data
    if d.source == "synthetic":
        from ivfast.data.synthetic import SyntheticClips

        return SyntheticClips(num_clips=d.synthetic_clips, num_frames=d.num_frames, size=d.img_size)
    from ivfast.data.video_list import VideoListDataset

    return VideoListDataset(d.list_file, root=d.root, num_frames=d.num_frames, size=d.img_size,
                            scales=tuple(d.scales), flip=d.flip, train=True)


def build_loader(cfg: Config, dataset, rank: int, world: int, pin_memory: bool) -> tuple[DataLoader, ShardedBatchSampler]:
    sampler = ShardedBatchSampler(len(dataset), cfg.data.batch_size, rank, world, cfg.train.seed)
    workers = cfg.data.num_workers
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

