"""Per-sample random streams and the rank-sharded, resumable batch order."""
import numpy as np
import torch

from ivfast.data.loader import ShardedBatchSampler
from ivfast.rng import SampleRNG


def test_rows_depend_only_on_their_sample():
    a = SampleRNG.for_step(0, 5, [3, 7, 9])
    b = SampleRNG.for_step(0, 5, [9, 3])
    ra, rb = a.randn("noise", 4, 6), b.randn("noise", 4, 6)
    assert torch.equal(ra[0], rb[1]) and torch.equal(ra[2], rb[0])
    assert not torch.equal(ra[0], ra[1])


def test_streams_steps_and_seeds_differ():
    r = SampleRNG.for_step(0, 5, [1])
    assert not torch.equal(r.rand("a", 8), r.rand("b", 8))
    assert torch.equal(r.rand("a", 8), r.rand("a", 8))
    assert not torch.equal(r.rand("a", 8), SampleRNG.for_step(0, 6, [1]).rand("a", 8))
    assert not torch.equal(r.rand("a", 8), SampleRNG.for_step(1, 5, [1]).rand("a", 8))
    t = r.randint("t", 1000, 50)
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() < 1000


def test_batches_are_the_same_samples_for_any_world_size():
    one = ShardedBatchSampler(40, 8, rank=0, world=1, seed=3)
    two = [ShardedBatchSampler(40, 4, rank=r, world=2, seed=3) for r in range(2)]
    for epoch in (0, 1):
        one.set_position(epoch)
        for s in two:
            s.set_position(epoch)
        for b1, b20, b21 in zip(one, *two):
            assert b1 == b20 + b21
    assert len(one) == 5


def test_epochs_permute_and_resume_position():
    s = ShardedBatchSampler(40, 8, rank=0, world=1, seed=3)
    full = list(s)
    assert sorted(i for b in full for i, _ in b) == list(range(40))
    s.set_position(1)
    assert list(s) != full
    s.set_position(0, start_batch=2)
    assert list(s) == full[2:]
    assert len({seed for b in full for _, seed in b}) == 40
    assert isinstance(np.int64(full[0][0][0]).item(), int)
