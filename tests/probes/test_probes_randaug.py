"""RandAugment for clips: every op against hand-computed values, temporal consistency, seeding, draw statistics."""
import numpy as np
import pytest
import torch

from ivfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from ivfast.probes import randaug as ra
from ivfast.probes.randaug import OPS, OpDraw, RandAugClips, RandAugment

FILL = (7, 8, 9)


def u8(values, shape=None):
    t = torch.tensor(values, dtype=torch.uint8)
    return t if shape is None else t.view(*shape)


def clip_of(pixels):
    """A (1, 1, N, 3) clip whose pixels are the (r, g, b) triples given."""
    return u8(pixels).view(1, 1, -1, 3)


# ----------------------------------------------------------------------------- pixel ops
def test_invert_posterize_solarize():
    x = clip_of([[0, 10, 255], [100, 127, 128]])
    assert ra.invert(x).flatten().tolist() == [255, 245, 0, 155, 128, 127]
    assert ra.posterize(u8([255, 100, 63, 64], (1, 1, 4, 1)), 2).flatten().tolist() == [192, 64, 0, 64]
    assert ra.posterize(x, 8).equal(x) and ra.posterize(x, 0).eq(0).all()
    assert ra.solarize(x, 128).flatten().tolist() == [0, 10, 0, 100, 127, 127]  # >= 128 inverted
    assert ra.solarize_add(clip_of([[100, 127, 128], [250, 0, 120]]), 30).flatten().tolist() == \
        [130, 157, 128, 250, 30, 150]  # only values < 128 get +30, clipped at 255


def test_brightness_color_contrast():
    x = clip_of([[100, 200, 40], [255, 0, 0]])
    assert ra.brightness(x, 0.5).flatten().tolist() == [50, 100, 20, 128, 0, 0]  # 127.5 rounds to even 128
    assert ra.brightness(x, 1.5).flatten().tolist() == [150, 255, 60, 255, 0, 0]
    assert ra.brightness(x, 1.0).equal(x)
    # factor 0: gray = 0.299 R + 0.587 G + 0.114 B in all three channels
    g0, g1 = round(0.299 * 100 + 0.587 * 200 + 0.114 * 40), round(0.299 * 255)
    assert ra.color(x, 0.0).flatten().tolist() == [g0] * 3 + [g1] * 3
    assert ra.color(x, 1.0).equal(x)
    # contrast 0: the clip's mean gray (frame 0 all 0, frame 1 all 100 -> 50 everywhere, both frames)
    two = torch.stack([torch.zeros(2, 2, 3, dtype=torch.uint8), torch.full((2, 2, 3), 100, dtype=torch.uint8)])
    assert ra.contrast(two, 0.0).eq(50).all()
    assert ra.contrast(two, 2.0).flatten().unique().tolist() == [0, 150]  # 50 + 2 (x - 50)


def test_autocontrast_per_channel_over_the_clip():
    r = [55, 100, 140]  # span 85: scale 3
    x = torch.zeros(3, 1, 1, 3, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor(r, dtype=torch.uint8)  # one value per frame: the clip-wide range counts
    x[:, 0, 0, 1] = 77  # flat channel: unchanged
    x[:, 0, 0, 2] = torch.tensor([0, 255, 3], dtype=torch.uint8)  # already full range
    y = ra.autocontrast(x)
    assert y[:, 0, 0, 0].tolist() == [0, 135, 255]
    assert y[:, 0, 0, 1].tolist() == [77, 77, 77]
    assert y[:, 0, 0, 2].tolist() == [0, 255, 3]


def test_equalize_uses_the_clip_histogram():
    # 3 frames of 255 pixels, each frame one level (10, 20, 30): step = (765 - 255) // 255 = 2,
    # lut[10] = (0 + 1) // 2 = 0, lut[20] = (255 + 1) // 2 = 128, lut[30] = (510 + 1) // 2 = 255.
    x = torch.stack([torch.full((15, 17, 3), v, dtype=torch.uint8) for v in (10, 20, 30)])
    y = ra.equalize(x)
    assert [y[i].unique().tolist() for i in range(3)] == [[0], [128], [255]]
    assert ra.equalize(x[:1]).equal(x[:1])  # one level only: step 0, unchanged


def test_sharpness_hand_computed():
    x = torch.zeros(1, 5, 5, 1, dtype=torch.uint8)
    x[0, 2, 2, 0] = 130
    smooth = ra.sharpness(x, 0.0)[0, :, :, 0]  # kernel 1 1 1 / 1 5 1 / 1 1 1 over 13; borders kept
    want = torch.zeros(5, 5, dtype=torch.uint8)
    want[1:4, 1:4] = 10
    want[2, 2] = 50
    assert smooth.equal(want)
    sharp = ra.sharpness(x, 2.0)[0, :, :, 0]  # 2 x - smooth: centre 210, ring -10 -> 0
    assert sharp[2, 2] == 210 and sharp.sum() == 210
    assert ra.sharpness(x, 1.0).equal(x)


# ----------------------------------------------------------------------------- geometric ops
def _pattern(t=2, h=5, w=5, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8))


def test_translate_by_whole_pixels():
    x = _pattern()
    y = ra.translate_x(x, 2, FILL)
    assert y[:, :, 2:].equal(x[:, :, :-2])
    assert (y[:, :, :2] == torch.tensor(FILL, dtype=torch.uint8)).all()
    y = ra.translate_y(x, -1, FILL)
    assert y[:, :-1].equal(x[:, 1:]) and (y[:, -1] == torch.tensor(FILL, dtype=torch.uint8)).all()


def test_rotate_quarter_turns():
    x = _pattern(h=6, w=6)
    # counter-clockwise on screen: the top-right corner goes to the top-left
    assert ra.rotate(x, 90, FILL).numpy().tolist() == np.rot90(x.numpy(), 1, axes=(1, 2)).tolist()
    assert ra.rotate(x, -90, FILL).numpy().tolist() == np.rot90(x.numpy(), -1, axes=(1, 2)).tolist()
    assert ra.rotate(x, 180, FILL).equal(x.flip(1).flip(2))
    sym = torch.zeros(1, 5, 5, 1, dtype=torch.uint8)  # a plus sign: unchanged by quarter turns
    sym[0, 2, :, 0] = 200
    sym[0, :, 2, 0] = 200
    assert ra.rotate(sym, 90, (0,)).equal(sym)


def test_shear_hand_computed():
    x = torch.zeros(1, 3, 3, 1, dtype=torch.uint8)
    x[0, :, 1, 0] = 100  # a vertical line through the centre
    y = ra.shear_x(x, 1.0, (0,))[0, :, :, 0]  # output (x, y) reads input (x + y, y) about the centre
    assert y.tolist() == [[0, 0, 100], [0, 100, 0], [100, 0, 0]]
    h = x.transpose(1, 2).contiguous()  # the horizontal line, sheared in y
    assert ra.shear_y(h, 1.0, (0,))[0, :, :, 0].tolist() == [[0, 0, 100], [0, 100, 0], [100, 0, 0]]


def test_magnitude_mapping():
    x = _pattern(h=8, w=10)
    assert ra.apply_op(x, OpDraw("TranslateX", 10.0, -1), FILL).equal(ra.translate_x(x, -4.5, FILL))
    assert ra.apply_op(x, OpDraw("Posterize", 9.0), FILL).equal(ra.posterize(x, 4))  # 8 - round(3.6)
    assert ra.apply_op(x, OpDraw("Solarize", 5.0), FILL).equal(ra.solarize(x, 128))
    assert ra.apply_op(x, OpDraw("Brightness", 10.0, -1), FILL).equal(ra.brightness(x, 0.1))
    assert ra.apply_op(x, OpDraw("Rotate", 0.0, 1), FILL).equal(x)
    with pytest.raises(ValueError, match="unknown RandAugment op 'Blur'"):
        ra.apply_op(x, OpDraw("Blur", 1.0), FILL)


# ----------------------------------------------------------------------------- RandAugment
def test_same_ops_on_every_frame():
    frame = _pattern(t=1, h=12, w=12, seed=3)
    clip = frame.expand(4, -1, -1, -1).contiguous()
    aug = RandAugment(num_ops=3, magnitude=9, magnitude_std=0.5, prob=1.0)
    seen = set()
    for seed in range(40):
        rng = np.random.default_rng(seed)
        plan = aug.draw(rng)
        seen.update(op.name for op in plan)
        out = aug.apply(clip, plan)
        assert all(out[i].equal(out[0]) for i in range(4)), plan
    assert len(seen) >= 12  # most ops exercised


def test_seeded_and_type_preserving():
    clip = _pattern(t=3, h=9, w=11, seed=1).numpy()
    aug = RandAugment(num_ops=2, prob=1.0)
    a = aug(clip, np.random.default_rng(5))
    b = aug(clip, np.random.default_rng(5))
    assert isinstance(a, np.ndarray) and a.dtype == np.uint8 and np.array_equal(a, b)
    outs = [aug(clip, np.random.default_rng(s)).tobytes() for s in range(10)]
    assert len(set(outs)) >= 8
    assert aug.draw(np.random.default_rng(5)) == aug.draw(np.random.default_rng(5))
    with pytest.raises(ValueError, match="uint8"):
        aug(clip.astype(np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="magnitude"):
        RandAugment(magnitude=11)


def test_draw_statistics():
    aug = RandAugment(num_ops=1, magnitude=9, magnitude_std=0.5, prob=1.0)
    rng = np.random.default_rng(0)
    draws = [aug.draw(rng)[0] for _ in range(30000)]
    m = np.array([d.magnitude for d in draws])
    # clip(N(9, 0.5), 0, 10): mean 9 - 0.5 (phi(2) - 2 (1 - Phi(2))) = 8.9958, std about 0.48
    assert m.min() >= 0 and m.max() == 10.0 and abs((m == 10).mean() - 0.0228) < 0.005
    assert abs(m.mean() - 8.9958) < 0.015 and 0.46 < m.std() < 0.50
    counts = np.array([sum(d.name == o for d in draws) for o in OPS])
    assert abs(counts - 2000).max() < 5 * np.sqrt(2000)  # uniform over the 15 ops
    signs = [d.sign for d in draws if d.name == "Rotate"]
    assert abs(np.mean(signs)) < 0.1 and all(d.sign == 1 for d in draws if d.name == "Invert")
    assert all(d.magnitude == 9 for d in RandAugment(num_ops=4, magnitude_std=0, prob=1).draw(rng))
    half = RandAugment(num_ops=2, prob=0.5)
    applied = np.mean([len(half.draw(rng)) for _ in range(4000)])
    assert abs(applied - 1.0) < 0.05  # 2 ops x 0.5


class _Clips:
    def __init__(self, frames):
        self.frames = frames

    def __len__(self):
        return 1

    def __getitem__(self, key):
        return {"video": normalize(self.frames.permute(0, 3, 1, 2), IMAGENET_MEAN, IMAGENET_STD), "label": 3,
                "index": key[0]}


def test_randaug_clips_round_trip_and_invert():
    frames = _pattern(t=2, h=6, w=7, seed=4)
    base = _Clips(frames)
    none = RandAugClips(base, RandAugment(num_ops=0))
    assert none.to_uint8(base[(0, 0)]["video"]).equal(frames)  # exact way back to uint8
    assert torch.allclose(none[(0, 5)]["video"], base[(0, 5)]["video"], atol=1e-6)
    inv = RandAugClips(base, RandAugment(num_ops=3, prob=1.0, ops=("Invert",)))  # odd count of inversions
    out = inv[(0, 9)]
    assert out["label"] == 3 and torch.allclose(out["video"], normalize((255 - frames).permute(0, 3, 1, 2),
                                                                         IMAGENET_MEAN, IMAGENET_STD), atol=1e-6)
    full = RandAugClips(base, RandAugment(num_ops=2, prob=1.0))
    assert full[(0, 11)]["video"].equal(full[(0, 11)]["video"])  # the plan follows the key's seed
