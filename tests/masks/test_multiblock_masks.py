"""V-JEPA multi-block masks: block geometry (release and log-uniform), structure, equal counts
(release: first tokens in time order; random subset), the release's context-free frames,
determinism, caps."""
import math
import random

import pytest
import torch

from ivfast.masks.multiblock import (
    RETRIES,
    batch_uniform,
    block_sizes,
    boxes_to_mask,
    equalise_visible,
    multiblock_masks,
    sample_boxes,
)
from ivfast.rng import SampleRNG

ASPECT = (0.75, 1.5)
SHAPES = ("release", "log_uniform")
MODES = [(e, b) for e in ("release", "random") for b in SHAPES]  # (equalise, block_shape)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one intra-op thread (on a busy shared CPU, OpenMP's threads only wait on each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale,grid", [(0.15, 16), (0.7, 16), (0.15, 64), (0.7, 64), (0.15, 4)])
def test_block_area_and_aspect(scale, grid, shape):
    g = torch.Generator().manual_seed(0)
    u = torch.rand(20000, 3, generator=g)
    top, left, bh, bw = sample_boxes(u, scale, ASPECT, grid, grid, shape).unbind(-1)
    area = int(grid * grid * scale) if shape == "release" else scale * grid * grid  # release: truncated
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
    bh, bw = block_sizes(u, 0.5, ASPECT, 4096, 4096, "log_uniform")  # huge grid: rounding negligible
    ratio = (bh.double() / bw.double())
    share_tall = float((ratio > 1).double().mean())
    assert share_tall == pytest.approx(math.log(1.5) / math.log(2.0), abs=0.01)  # log-uniform, not 2/3
    assert float(ratio.log().mean()) == pytest.approx(0.5 * (math.log(0.75) + math.log(1.5)), abs=0.01)


def test_release_aspect_is_uniform():
    u = torch.rand(200000, generator=torch.Generator().manual_seed(1))
    bh, bw = block_sizes(u, 0.5, ASPECT, 4096, 4096, "release")
    ratio = bh.double() / bw.double()
    assert float((ratio > 1).double().mean()) == pytest.approx((1.5 - 1.0) / 0.75, abs=0.01)  # 2/3
    assert float(ratio.mean()) == pytest.approx(1.125, abs=0.005)


def _release_size(u: float, scale: float, aspect, h: int, w: int) -> tuple[int, int]:
    """The release's formula, written out in Python floats: uniform aspect, truncated area."""
    a = aspect[0] + u * (aspect[1] - aspect[0])
    area = int(h * w * scale)
    return min(max(round(math.sqrt(area * a)), 1), h), min(max(round(math.sqrt(area / a)), 1), w)


@pytest.mark.parametrize("scale,h,w", [(0.15, 16, 16), (0.7, 16, 16), (0.15, 14, 20), (0.7, 7, 5), (0.05, 3, 3)])
def test_release_block_sizes_follow_the_formula(scale, h, w):
    u = torch.rand(4000, generator=torch.Generator().manual_seed(3))
    bh, bw = block_sizes(u, scale, ASPECT, h, w, "release")
    expected = [_release_size(x, scale, ASPECT, h, w) for x in u.double().tolist()]
    assert list(zip(bh.tolist(), bw.tolist())) == expected


def test_release_block_sizes_by_hand():
    u = torch.tensor([0.0, 0.5, 1.0 - 2 ** -24])
    # 16 x 16 at 0.7: area int(179.2) = 179; a = 0.75 -> (round 11.59, round 15.45); a = 1.125 ->
    # (round 14.19, round 12.61); a -> 1.5 -> (round 16.39, round 10.92).
    bh, bw = block_sizes(u, 0.7, ASPECT, 16, 16, "release")
    assert list(zip(bh.tolist(), bw.tolist())) == [(12, 15), (14, 13), (16, 11)]
    # 16 x 16 at 0.15: area int(38.4) = 38; a = 0.75 -> (round 5.34, round 7.12).
    assert [int(x[0]) for x in block_sizes(u[:1], 0.15, ASPECT, 16, 16, "release")] == [5, 7]
    # Truncated versus real area: 256 * 0.6129 = 156.9; sqrt(156) = 12.49 -> 12, sqrt(156.9) = 12.53 -> 13.
    assert [int(x[0]) for x in block_sizes(u[:1], 0.6129, (1.0, 1.0), 16, 16, "release")] == [12, 12]
    assert [int(x[0]) for x in block_sizes(u[:1], 0.6129, (1.0, 1.0), 16, 16, "log_uniform")] == [13, 13]
    with pytest.raises(ValueError, match="block_shape"):
        block_sizes(u, 0.7, ASPECT, 16, 16, "square")


def _stream_size(h: int, w: int, t: int, views=((8, 0.15), (2, 0.7))) -> int:
    """Uniforms one clip draws per call (the module's fixed layout): boxes, fallbacks, noise."""
    return sum(RETRIES * nb * 3 for nb, _ in views) + 2 * h * w + 2 * t * h * w


def test_release_shape_one_size_per_batch_for_both_views():
    t, h, w, b = 2, 16, 16, 12
    for offset in (0, 50, 900):
        views = multiblock_masks(b, (t, h, w), gens(b, offset=offset), small_blocks=1, large_blocks=1)
        # The batch's uniform: frac of the sum of each clip's first uniform.
        first = torch.stack([torch.rand(_stream_size(h, w, t, ((1, 0.15), (1, 0.7))), generator=g)[0]
                             for g in gens(b, offset=offset)])
        u = batch_uniform(first)
        assert 0.0 <= float(u) < 1.0 and float(u) == math.fmod(float(first.double().sum()), 1.0)
        for info, scale in zip(views, (0.15, 0.7)):
            # One block of one size: every clip has the same count, nothing is trimmed, and frame 0
            # shows the block itself.
            spatial = info.mask.view(b, t, h, w)[:, 0]
            rows, cols = spatial.any(dim=2), spatial.any(dim=1)
            sizes = set(zip(rows.sum(1).tolist(), cols.sum(1).tolist()))
            assert sizes == {_release_size(float(u), scale, ASPECT, h, w)}
            assert bool((spatial.sum(dim=(1, 2)) == rows.sum(1) * cols.sum(1)).all())  # a rectangle
            assert len({tuple(r.nonzero()[0].tolist() + c.nonzero()[0].tolist()) for r, c in zip(rows, cols)}) > 1


def test_batch_uniform_is_uniform_and_order_free():
    g = torch.Generator().manual_seed(4)
    u = torch.rand(20000, 14, generator=g)
    shared = torch.stack([batch_uniform(row) for row in u])
    assert shared.dtype == torch.float32 and float(shared.min()) >= 0 and float(shared.max()) < 1
    assert float(shared.double().mean()) == pytest.approx(0.5, abs=0.01)
    hist = torch.histc(shared, bins=10, min=0, max=1)
    assert float(hist.min()) > 1800 and float(hist.max()) < 2200  # 2000 each, +-4.7 sigma
    for row in u[:50]:  # bit-equal in any order
        assert float(batch_uniform(row[torch.randperm(14, generator=g)])) == float(batch_uniform(row))


def test_boxes_to_mask_is_the_union_of_rectangles():
    g = torch.Generator().manual_seed(2)
    boxes = sample_boxes(torch.rand(5, 7, 3, generator=g), 0.2, ASPECT, 9, 11)  # (5 clips, 7 blocks)
    masks = boxes_to_mask(boxes, 9, 11)
    for c in range(5):
        ref = torch.zeros(9, 11, dtype=torch.bool)
        for top, left, h, w in boxes[c].tolist():
            ref[top:top + h, left:left + w] = True
        assert torch.equal(masks[c], ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(5))
def test_masks_span_all_frames(seed, shape):
    t, h, w = 6, 16, 16
    views = multiblock_masks(1, (t, h, w), gens(1, offset=seed), block_shape=shape)  # one clip: no equalisation
    for info in views:
        m = info.mask.reshape(t, h * w)
        assert torch.equal(m, m[:1].expand(t, -1))
        check_partition(info, t * h * w)


@pytest.mark.parametrize("equalise,shape", MODES)
def test_equal_counts_and_partition_across_the_batch(equalise, shape):
    t, h, w = 4, 16, 16
    views = multiblock_masks(12, (t, h, w), gens(12), equalise=equalise, block_shape=shape)
    assert len(views) == 2
    for info in views:
        assert info.visible_idx.shape[0] == 12 and info.num_visible + info.num_masked == t * h * w
        assert ((~info.mask).sum(1) == info.num_visible).all()
        check_partition(info, t * h * w)
        assert info.num_visible >= 1 and info.num_masked >= 1


@pytest.mark.parametrize("equalise", ["release", "random"])
def test_each_clip_depends_only_on_its_own_stream(equalise):
    """log_uniform sizes: a clip's masks are its own stream's, whatever the batch, when the count
    is the cap's (the equalisation's target is otherwise the batch's smallest count)."""
    t, h, w = 4, 16, 16
    kw = {"equalise": equalise, "block_shape": "log_uniform"}
    a = multiblock_masks(3, (t, h, w), gens(3), max_visible=t * 4, **kw)
    b = multiblock_masks(3, (t, h, w), gens(3), **kw)
    c = multiblock_masks(3, (t, h, w), gens(3), **kw)
    for x, y in zip(b, c):  # same generators, same masks
        assert torch.equal(x.mask, y.mask)
    # Clip 0 in a different batch (other clips, other size) with the same count (the cap binds):
    mixed = gens(1) + gens(4, offset=100)
    d = multiblock_masks(5, (t, h, w), mixed, max_visible=t * 4, **kw)
    for x, y in zip(a, d):
        assert x.num_visible == y.num_visible == t * 4
        assert torch.equal(x.mask[0], y.mask[0])
    # Different streams differ.
    e = multiblock_masks(3, (t, h, w), gens(3, stream="other"), **kw)
    assert not torch.equal(b[0].mask, e[0].mask)


@pytest.mark.parametrize("equalise,shape", MODES)
def test_same_generators_same_masks_in_any_order(equalise, shape):
    """Every mode: the masks are a function of the clips' streams (reproducible, resumable), the
    stream advances by the same fixed count, and permuting the clips permutes the rows (the release
    shape's batch uniform and the equalisation's target are symmetric in the clips)."""
    t, h, w, b = 4, 16, 16, 7
    kw = {"equalise": equalise, "block_shape": shape, "max_visible": 200}
    g1, g2 = gens(b), gens(b)
    x, y = multiblock_masks(b, (t, h, w), g1, **kw), multiblock_masks(b, (t, h, w), g2, **kw)
    for p, q in zip(x, y):
        assert torch.equal(p.mask, q.mask)
    ref = gens(b)
    for g in ref:
        torch.rand(_stream_size(h, w, t), generator=g)
    assert all(torch.equal(g.get_state(), r.get_state()) for g, r in zip(g1, ref))  # fixed stream use
    perm = [3, 0, 6, 1, 5, 2, 4]
    z = multiblock_masks(b, (t, h, w), [gens(b)[i] for i in perm], **kw)
    for p, q in zip(x, z):
        assert torch.equal(p.mask[perm], q.mask)


@pytest.mark.parametrize("equalise", ["release", "random"])
def test_release_shape_shares_the_size_with_the_batch(equalise):
    """What the release shape gives up: a clip's masks depend on the other clips of its batch (the
    shared size, and with it where the blocks can sit), even where the cap fixes the count."""
    t, h, w = 2, 16, 16
    kw = {"equalise": equalise, "max_visible": t * 4, "small_blocks": 1, "large_blocks": 1}
    masks = [multiblock_masks(4, (t, h, w), gens(1) + gens(3, offset=100 + 10 * k), **kw)[1].mask[0]
             for k in range(6)]
    assert len({tuple(m.tolist()) for m in masks}) > 1


def test_same_spatial_masks_in_both_equalise_modes():
    t, h, w = 3, 16, 16
    for shape in SHAPES:
        for s in range(4):  # one clip: nothing to equalise
            r = multiblock_masks(1, (t, h, w), gens(1, offset=s), equalise="release", block_shape=shape)
            q = multiblock_masks(1, (t, h, w), gens(1, offset=s), equalise="random", block_shape=shape)
            assert all(torch.equal(x.mask, y.mask) for x, y in zip(r, q))


@pytest.mark.parametrize("equalise,shape", MODES)
def test_max_visible_caps_the_visible_count(equalise, shape):
    t, h, w = 8, 16, 16
    kw = {"equalise": equalise, "block_shape": shape}
    free = multiblock_masks(6, (t, h, w), gens(6), **kw)
    capped = multiblock_masks(6, (t, h, w), gens(6), max_visible=100, **kw)
    loose = multiblock_masks(6, (t, h, w), gens(6), max_visible=10**6, **kw)
    for f, c, lo in zip(free, capped, loose):
        assert c.num_visible == min(100, f.num_visible)
        assert lo.num_visible == f.num_visible and torch.equal(lo.mask, f.mask)
        # The capped mask only adds masked tokens to the uncapped one.
        assert bool((f.mask <= c.mask).all())


@pytest.mark.parametrize("equalise,shape", MODES)
def test_at_least_one_visible_and_one_masked_when_blocks_cover_everything(equalise, shape):
    kw = {"equalise": equalise, "block_shape": shape}
    # Two blocks the size of a 2 x 2 grid always cover it: every retry fails, the clamp unmasks one position.
    views = multiblock_masks(4, (3, 2, 2), gens(4), small_blocks=1, small_scale=1.0, large_blocks=2,
                             large_scale=1.0, **kw)
    for info in views:
        check_partition(info, 12)
        assert info.num_visible >= 1 and info.num_masked >= 1
    assert views[1].num_visible == 3  # one position, in all three frames
    # A mostly-covering setting: the retries find a draw with context.
    views = multiblock_masks(32, (2, 4, 4), gens(32), large_blocks=2, large_scale=0.7, **kw)
    assert all(v.num_visible >= 2 for v in views)  # whole tubes (2 frames) at least
    # max_visible=1 still leaves one visible token.
    views = multiblock_masks(4, (2, 4, 4), gens(4), max_visible=1, **kw)
    assert all(v.num_visible == 1 and v.num_masked == 31 for v in views)


def _reference_coverage(n, n_blocks, scale, h, w, seed, shape):
    """Independent Monte-Carlo: union of blocks with uniform corners, redrawn if all covered; sizes
    per block with log-uniform aspect, or (release) one per clip with uniform aspect, truncated area."""
    rnd = random.Random(seed)
    total = 0.0
    for _ in range(n):
        one_size = _release_size(rnd.random(), scale, ASPECT, h, w)
        for _try in range(RETRIES):
            cov = set()
            for _ in range(n_blocks):
                if shape == "release":
                    bh, bw = one_size
                else:
                    r = math.exp(rnd.uniform(math.log(ASPECT[0]), math.log(ASPECT[1])))
                    bh = min(h, max(1, round(math.sqrt(scale * h * w * r))))
                    bw = min(w, max(1, round(math.sqrt(scale * h * w / r))))
                top, left = rnd.randrange(h - bh + 1), rnd.randrange(w - bw + 1)
                cov.update((y, x) for y in range(top, top + bh) for x in range(left, left + bw))
            if len(cov) < h * w:
                break
        total += len(cov) / (h * w)
    return total / n


@pytest.mark.parametrize("shape", SHAPES)
def test_coverage_statistics_match_an_independent_simulation(shape):
    n, h, w = 1500, 16, 16
    cov = [0.0, 0.0]  # one clip per call: coverage before any equalisation
    for s in range(n):
        for i, info in enumerate(multiblock_masks(1, (1, h, w), gens(1, offset=s), block_shape=shape)):
            cov[i] += info.mask.float().mean().item() / n
    ref_small = _reference_coverage(n, 8, 0.15, h, w, seed=0, shape=shape)
    ref_large = _reference_coverage(n, 2, 0.7, h, w, seed=1, shape=shape)
    assert cov[0] == pytest.approx(ref_small, abs=0.015), (cov, ref_small)
    assert cov[1] == pytest.approx(ref_large, abs=0.015), (cov, ref_large)
    assert 0.55 < cov[0] < 0.8 and 0.75 < cov[1] < 0.95  # the V-JEPA regime: most of the clip is predicted


def test_random_equalisation_does_not_bias_time():
    t, h, w = 16, 8, 8
    views = multiblock_masks(64, (t, h, w), gens(64), max_visible=t * 4, equalise="random")
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


def test_release_equalisation_keeps_the_first_visible_tokens():
    f, m = False, True
    mask = torch.tensor([[f, m, f, f, m, f, m, f],    # visible 0 2 3 5 7
                         [m, m, f, m, f, m, m, f]])   # visible 2 4 7: the smallest count, 3
    noise = torch.rand(2, 8, generator=torch.Generator().manual_seed(0))
    out = equalise_visible(mask, noise, how="release")
    assert out.tolist() == [[f, m, f, f, m, m, m, m], mask[1].tolist()]  # row 0 keeps 0 2 3
    out = equalise_visible(mask, noise, max_visible=2, how="release")
    assert out.tolist() == [[f, m, f, m, m, m, m, m], [m, m, f, m, f, m, m, m]]  # 0 2 and 2 4
    assert torch.equal(equalise_visible(mask[1:], noise[1:], how="release"), mask[1:])  # already equal
    rnd = equalise_visible(mask, noise, max_visible=2, how="random")  # a random pair of each row's visible
    assert ((~rnd).sum(1) == 2).all() and bool((rnd >= mask).all())
    with pytest.raises(ValueError, match="equalise"):
        equalise_visible(mask, noise, how="last")


def test_release_equalisation_in_the_batch_is_a_prefix_in_time():
    t, h, w, b = 8, 8, 8, 6
    kw = {"block_shape": "log_uniform", "max_visible": 150}  # sizes per clip: the counts differ
    views = multiblock_masks(b, (t, h, w), gens(b), equalise="release", **kw)
    for v, info in enumerate(views):
        assert info.num_visible <= 150
        for c in range(b):
            alone = multiblock_masks(1, (t, h, w), gens(1, offset=c), **kw)[v]  # the clip's own mask
            # The clip keeps the first num_visible of its own visible tokens, in token order.
            assert torch.equal(info.visible_idx[c], alone.visible_idx[0, :info.num_visible])
            per_frame = (~info.mask[c]).view(t, h * w).sum(1)
            full = int((~alone.mask[0]).view(t, h * w).sum(1)[0])  # the spatial count, every frame
            k, r = divmod(info.num_visible, full)
            assert per_frame.tolist() == [full] * k + [r] * (k < t) + [0] * (t - k - 1)


# The release's own _MaskGenerator (get_jepa_mask_collator settings: 32 frames, 224 px, patch 14,
# tubelet 1, max_keep 1600), run on CPU over 20,000 batches of 14 (two runs of 10,000 with other
# seeds agreed): per batch, the share of (clip, frame) pairs without a visible token, and the kept
# (visible) count. Mean and the spread (standard deviation) of one batch's value:
RELEASE_NO_CONTEXT = ((0.4531, 0.0418), (0.5279, 0.1355))  # small-block view, large-block view
RELEASE_KEPT = ((1585.9, 65.1), (614.7, 262.2))
# (The issue quotes 45.5 % and 53.7 %: within the tolerances below; the reference's own standard
# error, 0.0003 and 0.001 for the shares, is negligible next to them.)
BATCHES = 200  # tolerance 4 standard errors of a BATCHES-batch mean: 0.012 and 0.038 for the shares


def test_release_masks_leave_later_frames_without_context_as_the_release_does():
    t, hw, b = 32, 16 * 16, 14
    no_context = [[], []]
    kept = [[], []]
    for k in range(BATCHES):
        views = multiblock_masks(b, (t, 16, 16), gens(b, stream="stage2_mask", offset=k * b), max_visible=1600,
                                 equalise="release", block_shape="release")
        for v, info in enumerate(views):
            has_context = ~info.mask.view(b, t, hw).all(dim=2)  # (clips, frames)
            # The kept context is a prefix in time: a frame without context is followed by none with.
            assert bool((has_context[:, 1:] <= has_context[:, :-1]).all()) and bool(has_context[:, 0].all())
            no_context[v].append(1.0 - has_context.double().mean().item())
            kept[v].append(info.num_visible)
    for v in range(2):
        (mean, sd), (kmean, ksd) = RELEASE_NO_CONTEXT[v], RELEASE_KEPT[v]
        got = sum(no_context[v]) / BATCHES
        assert got == pytest.approx(mean, abs=4 * sd / math.sqrt(BATCHES)), (v, got)
        got = sum(kept[v]) / BATCHES
        assert got == pytest.approx(kmean, abs=4 * ksd / math.sqrt(BATCHES)), (v, got)


def test_random_equalisation_keeps_context_in_every_frame():
    """The same setting with a random subset: every frame keeps a share of the context. (A frame can
    only empty by chance, when the batch's smallest count is a few positions per frame: measured, under
    0.01 % of the large view's frames over 1,000 batches; none of the small view's.)"""
    t, hw, b = 32, 16 * 16, 14
    empty = [0, 0]
    for k in range(20):
        views = multiblock_masks(b, (t, 16, 16), gens(b, stream="stage2_mask", offset=k * b), max_visible=1600,
                                 equalise="random", block_shape="release")
        for v, info in enumerate(views):
            empty[v] += int(info.mask.view(b, t, hw).all(dim=2).sum())
    assert empty[0] == 0 and empty[1] <= 0.001 * 20 * b * t
