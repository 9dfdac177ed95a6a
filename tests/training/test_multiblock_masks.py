"""V-JEPA multi-block masks: block geometry, structure, equal counts, determinism, caps."""
import math
import random

import pytest
import torch

from ivfast.masks.multiblock import RETRIES, block_sizes, boxes_to_mask, multiblock_masks, sample_boxes
from ivfast.rng import SampleRNG

ASPECT = (0.75, 1.5)


def gens(n, stream="m", offset=0):
    return SampleRNG(list(range(offset, offset + n))).generators(stream)


def check_partition(info, n):
    b = info.mask.shape[0]
    both = torch.cat([info.visible_idx, info.masked_idx], dim=1).sort(dim=1).values
    assert torch.equal(both, torch.arange(n).expand(b, n))
    for idx in (info.visible_idx, info.masked_idx):
        assert torch.equal(idx, idx.sort(dim=1).values)
    assert torch.equal(info.mask.gather(1, info.visible_idx), torch.zeros_like(info.visible_idx, dtype=torch.bool))
    assert bool(info.mask.gather(1, info.masked_idx).all())


@pytest.mark.parametrize("scale,grid", [(0.15, 16), (0.7, 16), (0.15, 64), (0.7, 64), (0.15, 4)])
def test_block_area_and_aspect(scale, grid):
    g = torch.Generator().manual_seed(0)
    u = torch.rand(20000, 3, generator=g)
    top, left, bh, bw = sample_boxes(u, scale, ASPECT, grid, grid).unbind(-1)
    area = scale * grid * grid
    a, b = math.sqrt(area * ASPECT[1]), math.sqrt(area / ASPECT[0])  # largest unrounded sides
    # Sides are the rounded sides of an area-`area` rectangle with aspect in range, clamped to the grid.
    assert int(bh.min()) >= min(grid, round(math.sqrt(area * ASPECT[0]))) and int(bh.max()) <= min(grid, round(a))
    assert int(bw.min()) >= min(grid, round(math.sqrt(area / ASPECT[1]))) and int(bw.max()) <= min(grid, round(b))
    if grid >= 16:  # no clamping at these sizes: the area is the target within rounding
        err = (bh * bw - area).abs().float()
        bound = 0.5 * (bh + bw).float() + 0.25 + 1e-6
        assert bool((err <= bound).all()), float((err - bound).max())
    if grid >= 16:  # aspect ratio (height / width) in range up to the rounding of both sides
        lo, hi = ASPECT
        ratio = bh.double() / bw.double()
        r_min = (math.sqrt(area * lo) - 0.5) / (math.sqrt(area / lo) + 0.5)
        r_max = (math.sqrt(area * hi) + 0.5) / (math.sqrt(area / hi) - 0.5)
        assert r_min <= float(ratio.min()) and float(ratio.max()) <= r_max
    # Blocks fit in the grid and their corners are uniform over the positions where they fit.
    assert bool((top >= 0).all() and (left >= 0).all() and (top + bh <= grid).all() and (left + bw <= grid).all())
    if grid == 16 and scale == 0.15:
        assert int(top.min()) == 0 and bool(((top + bh) == grid).any())


def test_aspect_is_log_uniform():
    u = torch.rand(200000, generator=torch.Generator().manual_seed(1))
    bh, bw = block_sizes(u, 0.5, ASPECT, 4096, 4096)  # huge grid: rounding negligible
    ratio = (bh.double() / bw.double())
    share_tall = float((ratio > 1).double().mean())
    assert share_tall == pytest.approx(math.log(1.5) / math.log(2.0), abs=0.01)  # log-uniform, not 2/3
    assert float(ratio.log().mean()) == pytest.approx(0.5 * (math.log(0.75) + math.log(1.5)), abs=0.01)


def test_boxes_to_mask_is_the_union_of_rectangles():
    g = torch.Generator().manual_seed(2)
    boxes = sample_boxes(torch.rand(5, 7, 3, generator=g), 0.2, ASPECT, 9, 11)  # (5 clips, 7 blocks)
    masks = boxes_to_mask(boxes, 9, 11)
    for c in range(5):
        ref = torch.zeros(9, 11, dtype=torch.bool)
        for top, left, h, w in boxes[c].tolist():
            ref[top:top + h, left:left + w] = True
        assert torch.equal(masks[c], ref)


@pytest.mark.parametrize("seed", range(5))
def test_masks_span_all_frames(seed):
    t, h, w = 6, 16, 16
    views = multiblock_masks(1, (t, h, w), gens(1, offset=seed))  # one clip: no equalisation
    for info in views:
        m = info.mask.reshape(t, h * w)
        assert torch.equal(m, m[:1].expand(t, -1))
        check_partition(info, t * h * w)


def test_equal_counts_and_partition_across_the_batch():
    t, h, w = 4, 16, 16
    views = multiblock_masks(12, (t, h, w), gens(12))
    assert len(views) == 2
    for info in views:
        assert info.visible_idx.shape[0] == 12 and info.num_visible + info.num_masked == t * h * w
        assert ((~info.mask).sum(1) == info.num_visible).all()
        check_partition(info, t * h * w)
        assert info.num_visible >= 1 and info.num_masked >= 1


def test_each_clip_depends_only_on_its_own_stream():
    t, h, w = 4, 16, 16
    a = multiblock_masks(3, (t, h, w), gens(3), max_visible=t * 4)
    b = multiblock_masks(3, (t, h, w), gens(3))
    c = multiblock_masks(3, (t, h, w), gens(3))
    for x, y in zip(b, c):  # same generators, same masks
        assert torch.equal(x.mask, y.mask)
    # Clip 0 in a different batch (other clips, other size) with the same count (the cap binds):
    mixed = gens(1) + gens(4, offset=100)
    d = multiblock_masks(5, (t, h, w), mixed, max_visible=t * 4)
    for x, y in zip(a, d):
        assert x.num_visible == y.num_visible == t * 4
        assert torch.equal(x.mask[0], y.mask[0])
    # Different streams differ.
    e = multiblock_masks(3, (t, h, w), gens(3, stream="other"))
    assert not torch.equal(b[0].mask, e[0].mask)


def test_max_visible_caps_the_visible_count():
    t, h, w = 8, 16, 16
    free = multiblock_masks(6, (t, h, w), gens(6))
    capped = multiblock_masks(6, (t, h, w), gens(6), max_visible=100)
    loose = multiblock_masks(6, (t, h, w), gens(6), max_visible=10**6)
    for f, c, lo in zip(free, capped, loose):
        assert c.num_visible == min(100, f.num_visible)
        assert lo.num_visible == f.num_visible and torch.equal(lo.mask, f.mask)
        # The capped mask only adds masked tokens to the uncapped one.
        assert bool((f.mask <= c.mask).all())


def test_at_least_one_visible_and_one_masked_when_blocks_cover_everything():
    # Two blocks of 99 % of a 2 x 2 grid always cover it: every retry fails, the clamp unmasks one position.
    views = multiblock_masks(4, (3, 2, 2), gens(4), small_blocks=1, small_scale=0.99, large_blocks=2,
                             large_scale=0.99)
    for info in views:
        check_partition(info, 12)
        assert info.num_visible >= 1 and info.num_masked >= 1
    assert views[1].num_visible == 3  # one position, in all three frames
    # A mostly-covering setting: the retries find a draw with context.
    views = multiblock_masks(32, (2, 4, 4), gens(32), large_blocks=2, large_scale=0.7)
    assert all(v.num_visible >= 2 for v in views)  # whole tubes (2 frames) at least
    # max_visible=1 still leaves one visible token.
    views = multiblock_masks(4, (2, 4, 4), gens(4), max_visible=1)
    assert all(v.num_visible == 1 and v.num_masked == 31 for v in views)


def _reference_coverage(n, n_blocks, scale, h, w, seed):
    """Independent Monte-Carlo: union of blocks with log-uniform aspect, uniform corners, redrawn if all covered."""
    rnd = random.Random(seed)
    total = 0.0
    for _ in range(n):
        for _try in range(RETRIES):
            cov = set()
            for _ in range(n_blocks):
                r = math.exp(rnd.uniform(math.log(ASPECT[0]), math.log(ASPECT[1])))
                bh = min(h, max(1, round(math.sqrt(scale * h * w * r))))
                bw = min(w, max(1, round(math.sqrt(scale * h * w / r))))
                top, left = rnd.randrange(h - bh + 1), rnd.randrange(w - bw + 1)
                cov.update((y, x) for y in range(top, top + bh) for x in range(left, left + bw))
            if len(cov) < h * w:
                break
        total += len(cov) / (h * w)
    return total / n


def test_coverage_statistics_match_an_independent_simulation():
    n, h, w = 1500, 16, 16
    cov = [0.0, 0.0]  # one clip per call: coverage before any equalisation
    for s in range(n):
        for i, info in enumerate(multiblock_masks(1, (1, h, w), gens(1, offset=s))):
            cov[i] += info.mask.float().mean().item() / n
    ref_small = _reference_coverage(n, 8, 0.15, h, w, seed=0)
    ref_large = _reference_coverage(n, 2, 0.7, h, w, seed=1)
    assert cov[0] == pytest.approx(ref_small, abs=0.015), (cov, ref_small)
    assert cov[1] == pytest.approx(ref_large, abs=0.015), (cov, ref_large)
    assert 0.55 < cov[0] < 0.8 and 0.75 < cov[1] < 0.95  # the V-JEPA regime: most of the clip is predicted


def test_equalisation_does_not_bias_time():
    t, h, w = 16, 8, 8
    views = multiblock_masks(64, (t, h, w), gens(64), max_visible=t * 4)
    for info in views:
        vis_per_frame = (~info.mask).reshape(64, t, h * w).sum(dim=(0, 2)).double()
        # Every frame keeps its share of the context (truncation in time order would empty the last frames).
        assert float(vis_per_frame.min()) > 0.6 * float(vis_per_frame.mean())
        assert float(vis_per_frame.max()) < 1.4 * float(vis_per_frame.mean())


def test_bad_arguments():
    with pytest.raises(ValueError, match="generators"):
        multiblock_masks(3, (2, 4, 4), gens(2))
    with pytest.raises(ValueError, match="aspect"):
        multiblock_masks(1, (2, 4, 4), gens(1), aspect=(1.5, 0.75))
    with pytest.raises(ValueError, match="scale"):
        multiblock_masks(1, (2, 4, 4), gens(1), small_scale=0.0)
