import pytest
import torch

from ivfast.masks import MaskInfo, num_visible_per_frame, semantic_mask, tube_mask


def check_partition(info: MaskInfo, frames: int, L: int, n_vis: int):
    b, n = info.mask.shape
    assert n == frames * L
    assert info.visible_idx.dtype == torch.int64 and info.masked_idx.dtype == torch.int64
    assert info.visible_idx.shape == (b, frames * n_vis)
    assert info.masked_idx.shape == (b, frames * (L - n_vis))
    both = torch.cat([info.visible_idx, info.masked_idx], dim=1).sort(dim=1).values
    assert torch.equal(both, torch.arange(n).expand(b, n))
    for idx in (info.visible_idx, info.masked_idx):
        if idx.shape[1] > 1:
            assert (idx[:, 1:] > idx[:, :-1]).all()
    assert not info.mask.gather(1, info.visible_idx).any()
    assert info.mask.gather(1, info.masked_idx).all()
    per_frame_visible = (~info.mask).view(b, frames, L).sum(-1)
    assert (per_frame_visible == n_vis).all()


def test_num_visible_rounding():
    assert num_visible_per_frame(256, 0.75) == 64
    assert num_visible_per_frame(256, 0.8) == 52  # int(204.8) = 204
    assert num_visible_per_frame(256, 0.9) == 26
    assert num_visible_per_frame(16, 0.9) == 2
    with pytest.raises(ValueError):
        num_visible_per_frame(16, 1.5)


@pytest.mark.parametrize("L", [16, 256])
@pytest.mark.parametrize("ratio", [0.75, 0.8, 0.9])
def test_semantic_mask_counts_and_partition(L, ratio):
    b, t = 3, 4
    g = torch.Generator().manual_seed(1)
    sal = torch.rand(b * t, L, generator=g).softmax(-1)
    info = semantic_mask(sal, b, t, ratio, generator=g)
    check_partition(info, t, L, num_visible_per_frame(L, ratio))


@pytest.mark.parametrize("L", [16, 256])
@pytest.mark.parametrize("ratio", [0.75, 0.8, 0.9])
def test_tube_mask_counts_and_same_in_every_frame(L, ratio):
    b, t = 3, 4
    g = torch.Generator().manual_seed(2)
    info = tube_mask(b, t, L, ratio, generator=g)
    check_partition(info, t, L, num_visible_per_frame(L, ratio))
    m = info.mask.view(b, t, L)
    assert torch.equal(m, m[:, :1].expand(b, t, L))
    assert not torch.equal(m[0], m[1]) or not torch.equal(m[1], m[2])  # clips differ


def test_saliency_bias():
    # 4 hot patches out of 64 carry 96% of the mass; 16 visible per frame.
    L, draws = 64, 2000
    hot = torch.tensor([3, 17, 40, 63])
    sal = torch.full((draws, L), 0.04 / 60)
    sal[:, hot] = 0.24
    g = torch.Generator().manual_seed(123)
    info = semantic_mask(sal, draws, 1, 0.75, generator=g)
    visible = ~info.mask  # (draws, L)
    hot_rate = visible[:, hot].float().mean().item()
    cold = torch.ones(L, dtype=torch.bool)
    cold[hot] = False
    cold_rate = visible[:, cold].float().mean().item()
    # Uniform would give 16 / 64 = 0.25 for every patch. With this saliency a hot patch is
    # visible with probability > 0.99; over 8000 hot draws the mean cannot fall near 0.25.
    assert hot_rate > 0.95
    assert cold_rate < 0.25


def test_zero_and_nan_rows_fall_back_to_uniform():
    L, draws, n_vis = 8, 4000, 2
    sal = torch.zeros(draws, L)
    sal[: draws // 2, 0] = float("nan")
    g = torch.Generator().manual_seed(7)
    info = semantic_mask(sal, draws, 1, 0.75, generator=g)
    check_partition(info, 1, L, n_vis)
    rate = (~info.mask).float().mean(0)  # expected 2 / 8 = 0.25 per patch, sd ~ 0.007
    assert ((rate - 0.25).abs() < 0.05).all(), rate


def test_partial_zero_rows_draw_positive_first_then_uniform_zeros():
    # 1 positive patch, 3 visible per frame: the positive patch is always visible and the
    # other two are spread uniformly over the 7 zero-saliency patches.
    L, draws = 8, 4000
    sal = torch.zeros(draws, L)
    sal[:, 5] = 1.0
    g = torch.Generator().manual_seed(8)
    info = semantic_mask(sal, draws, 1, 0.625, generator=g)  # 8 - int(5) = 3 visible
    vis = ~info.mask
    assert vis[:, 5].all()
    rate = vis[:, [0, 1, 2, 3, 4, 6, 7]].float().mean(0)  # expected 2 / 7 ~ 0.286
    assert ((rate - 2 / 7).abs() < 0.05).all(), rate


def test_determinism():
    b, t, L = 2, 3, 16
    sal = torch.rand(b * t, L)
    a = semantic_mask(sal, b, t, 0.75, generator=torch.Generator().manual_seed(5))
    c = semantic_mask(sal, b, t, 0.75, generator=torch.Generator().manual_seed(5))
    d = semantic_mask(sal, b, t, 0.75, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.mask, c.mask)
    assert not torch.equal(a.mask, d.mask)
    a = tube_mask(b, t, L, 0.75, generator=torch.Generator().manual_seed(5))
    c = tube_mask(b, t, L, 0.75, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.mask, c.mask)


def test_per_clip_generators():
    b, t, L = 3, 2, 16
    sal = torch.rand(b * t, L)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    a = semantic_mask(sal, b, t, 0.75, generator=gens([1, 2, 3]))
    # clip 1's mask depends only on its own generator (and its own saliency rows)
    c = semantic_mask(sal[t:2 * t], 1, t, 0.75, generator=gens([2]))
    assert torch.equal(a.mask[1], c.mask[0])
    check_partition(a, t, L, 4)
    a = tube_mask(b, t, L, 0.75, generator=gens([1, 2, 3]))
    c = tube_mask(1, t, L, 0.75, generator=gens([3]))
    assert torch.equal(a.mask[2], c.mask[0])
    with pytest.raises(ValueError):
        semantic_mask(sal, b, t, 0.75, generator=gens([1, 2]))


def test_from_mask():
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    info = MaskInfo.from_mask(mask)
    assert info.visible_idx.tolist() == [[1, 3], [0, 1]]
    assert info.masked_idx.tolist() == [[0, 2], [2, 3]]
    with pytest.raises(ValueError, match="same number of visible"):
        MaskInfo.from_mask(torch.tensor([[True, False], [False, False]]))


def test_extreme_ratios():
    sal = torch.rand(2, 16)
    info = semantic_mask(sal, 1, 2, 0.0)
    assert info.num_masked == 0 and info.num_visible == 32
    info = semantic_mask(sal, 1, 2, 1.0)
    assert info.num_visible == 0 and info.num_masked == 32
