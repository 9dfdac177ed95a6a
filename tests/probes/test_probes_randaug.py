"""RandAugment for clips as timm defines it: timm's level-to-argument tables at several
magnitudes (both variants), the timm string grammar, the ops against hand-computed pixels and
against PIL (what timm calls), the same plan on every frame, seeding, draw statistics."""
import numpy as np
import pytest
import torch

from ivfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from ivfast.probes import randaug as ra
from ivfast.probes.randaug import (RAND_INCREASING_TRANSFORMS, RAND_TRANSFORMS, OpDraw, RandAugClips, RandAugment,
                                   level_to_arg, parse_rand_augment)

FILL = (7, 8, 9)


def u8(values, shape=None):
    t = torch.tensor(values, dtype=torch.uint8)
    return t if shape is None else t.view(*shape)


def clip_of(pixels):
    """A (1, 1, N, 3) clip whose pixels are the (r, g, b) triples given."""
    return u8(pixels).view(1, 1, -1, 3)


def _pattern(t=2, h=5, w=5, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- timm's tables
# Expected values written out from timm's formulas (timm/data/auto_augment.py), level m:
#   Rotate (m/10)*30, Shear (m/10)*0.3, TranslateRel (m/10)*0.45, all with a random sign;
#   Posterize int((m/10)*4) bits kept; PosterizeIncreasing 4 - that; PosterizeOriginal that + 4;
#   Solarize min(256, int((m/10)*256)); SolarizeIncreasing 256 - that; SolarizeAdd min(128, int((m/10)*110));
#   Color/Contrast/Brightness/Sharpness (m/10)*1.8 + 0.1 (no sign); *Increasing max(0.1, 1 +- (m/10)*0.9).
LEVELS = (0, 2.4, 2.5, 5, 7, 9, 10)
TABLE = {
    "Posterize": (0, 0, 1, 2, 2, 3, 4),
    "PosterizeIncreasing": (4, 4, 3, 2, 2, 1, 0),
    "PosterizeOriginal": (4, 4, 5, 6, 6, 7, 8),
    "Solarize": (0, 61, 64, 128, 179, 230, 256),
    "SolarizeIncreasing": (256, 195, 192, 128, 77, 26, 0),
    "SolarizeAdd": (0, 26, 27, 55, 77, 99, 110),
    "Rotate": (0, 7.2, 7.5, 15, 21, 27, 30),
    "ShearX": (0, 0.072, 0.075, 0.15, 0.21, 0.27, 0.3),
    "TranslateXRel": (0, 0.108, 0.1125, 0.225, 0.315, 0.405, 0.45),
    "Color": (0.1, 0.532, 0.55, 1.0, 1.36, 1.72, 1.9),
    "ColorIncreasing": (1.0, 1.216, 1.225, 1.45, 1.63, 1.81, 1.9),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_level_to_arg_tables(name):
    for level, want in zip(LEVELS, TABLE[name]):
        got = level_to_arg(name, level, sign=1)
        if name.startswith(("Posterize", "Solarize")):  # timm truncates with int()
            assert got == want and isinstance(got, int), (name, level, got)
        else:
            assert got == pytest.approx(want, abs=1e-12), (name, level, got)


def test_level_to_arg_signs_and_shared_rows():
    for level in LEVELS:
        for a, b in (("ShearY", "ShearX"), ("TranslateYRel", "TranslateXRel"), ("Contrast", "Color"),
                     ("Brightness", "Color"), ("Sharpness", "Color"), ("ContrastIncreasing", "ColorIncreasing"),
                     ("BrightnessIncreasing", "ColorIncreasing"), ("SharpnessIncreasing", "ColorIncreasing")):
            assert level_to_arg(a, level, 1) == level_to_arg(b, level, 1)
        for signed in ("Rotate", "ShearX", "TranslateYRel"):
            assert level_to_arg(signed, level, -1) == -level_to_arg(signed, level, 1)
        for unsigned in ("Color", "Posterize", "Solarize", "SolarizeAdd", "PosterizeIncreasing"):
            assert level_to_arg(unsigned, level, -1) == level_to_arg(unsigned, level, 1)
    # increasing enhance, negative sign: 1 - (m/10)*0.9, never below 0.1
    assert [round(level_to_arg("ColorIncreasing", m, -1), 12) for m in (0, 5, 9, 10, 20)] == [1.0, 0.55, 0.19, 0.1, 0.1]
    # magnitudes above 10 (mmax): timm's caps
    assert level_to_arg("Solarize", 15) == 256 and level_to_arg("SolarizeAdd", 15) == 128
    assert level_to_arg("Rotate", 20) == 60.0
    assert [level_to_arg(n, 5) for n in ("AutoContrast", "Equalize", "Invert")] == [None] * 3
    with pytest.raises(ValueError, match="unknown RandAugment op 'Blur'"):
        level_to_arg("Blur", 1)


def test_op_lists_are_timms():
    assert len(RAND_TRANSFORMS) == len(RAND_INCREASING_TRANSFORMS) == 15
    changed = [(a, b) for a, b in zip(RAND_TRANSFORMS, RAND_INCREASING_TRANSFORMS) if a != b]
    assert changed == [(n, n + "Increasing") for n in ("Posterize", "Solarize", "Color", "Contrast", "Brightness",
                                                       "Sharpness")]
    assert RAND_TRANSFORMS[-2:] == ("TranslateXRel", "TranslateYRel")


def test_apply_op_uses_the_table():
    x = _pattern(h=8, w=10)
    assert ra.apply_op(x, OpDraw("Posterize", 9.0), FILL).equal(ra.posterize(x, 3))
    assert ra.apply_op(x, OpDraw("PosterizeIncreasing", 9.0), FILL).equal(ra.posterize(x, 1))
    assert ra.apply_op(x, OpDraw("Solarize", 9.0), FILL).equal(ra.solarize(x, 230))
    assert ra.apply_op(x, OpDraw("SolarizeIncreasing", 9.0), FILL).equal(ra.solarize(x, 26))
    assert ra.apply_op(x, OpDraw("SolarizeAdd", 9.0), FILL).equal(ra.solarize_add(x, 99))
    assert ra.apply_op(x, OpDraw("Brightness", 9.0), FILL).equal(ra.brightness(x, 0.9 * 1.8 + 0.1))
    assert ra.apply_op(x, OpDraw("BrightnessIncreasing", 9.0, -1), FILL).equal(ra.brightness(x, 1 - 0.9 * 0.9))
    assert ra.apply_op(x, OpDraw("TranslateXRel", 10.0, -1), FILL).equal(ra.translate_x(x, -4.5, FILL))
    assert ra.apply_op(x, OpDraw("TranslateYRel", 10.0, 1), FILL).equal(ra.translate_y(x, 3.6, FILL))
    assert ra.apply_op(x, OpDraw("Rotate", 0.0, 1), FILL).equal(x)


# ----------------------------------------------------------------------------- the string grammar
def test_parse_timm_strings():
    p = parse_rand_augment("rand-m9-n2-mstd0.5")
    assert (p["magnitude"], p["num_ops"], p["magnitude_std"], p["prob"], p["magnitude_max"]) == (9, 2, 0.5, 0.5, None)
    assert p["ops"] == RAND_TRANSFORMS and p["choice_weights"] is None
    p = parse_rand_augment("rand-m7-n4-mstd0.5-inc1")
    assert (p["magnitude"], p["num_ops"], p["ops"]) == (7, 4, RAND_INCREASING_TRANSFORMS)
    assert parse_rand_augment("rand-inc0")["ops"] == RAND_TRANSFORMS
    p = parse_rand_augment("rand")  # timm's defaults
    assert (p["magnitude"], p["num_ops"], p["magnitude_std"], p["prob"]) == (10, 2, 0.0, 0.5)
    assert parse_rand_augment("rand-mstd101")["magnitude_std"] == float("inf")  # uniform sampling
    assert parse_rand_augment("rand-m15-mmax20")["magnitude_max"] == 20
    assert parse_rand_augment("rand-n3-p0.8-m9")["prob"] == 0.8  # any order
    w0 = parse_rand_augment("rand-m9-mstd0.5-w0")
    assert w0["choice_weights"] == ra.RAND_CHOICE_WEIGHTS_W0 and w0["ops"] == RAND_TRANSFORMS
    tw = parse_rand_augment("rand-m9-tweights")
    assert tw["ops"][:3] == ("Rotate", "ShearX", "ShearY") and tw["choice_weights"][:3] == (3, 2, 2)
    aug = RandAugment.from_string("rand-m7-n4-mstd0.5-inc1")
    assert (aug.num_ops, aug.magnitude, aug.magnitude_std, aug.ops) == (4, 7.0, 0.5, RAND_INCREASING_TRANSFORMS)


@pytest.mark.parametrize("bad,match", [("randaug-m9", "must start with 'rand'"), ("rand-x3", "unknown section 'x3'"),
                                       ("rand-m9-foo", "unknown section 'foo'"), ("rand-inc", "unknown section 'inc'"),
                                       ("rand-m9.5", "'9.5' is not an integer"), ("rand-w1", "only the weight set w0"),
                                       ("rand-mstd0.5.1", "is not a number"), ("m9-n2", "must start with 'rand'")])
def test_parse_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_rand_augment(bad)


# ----------------------------------------------------------------------------- pixel ops, hand-computed
def test_invert_posterize_solarize():
    x = clip_of([[0, 10, 255], [100, 127, 128]])
    assert ra.invert(x).flatten().tolist() == [255, 245, 0, 155, 128, 127]
    v = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1)
    assert ra.posterize(v, 4).equal((v >> 4) << 4)  # 4 bits kept
    assert ra.posterize(v, 3).equal((v >> 5) << 5) and ra.posterize(v, 1).equal((v >> 7) << 7)
    assert ra.posterize(u8([255, 100, 63, 64], (1, 1, 4, 1)), 2).flatten().tolist() == [192, 64, 0, 64]
    assert ra.posterize(x, 8).equal(x) and ra.posterize(x, 0).eq(0).all() and ra.posterize(x, -4).eq(0).all()
    assert ra.solarize(x, 128).flatten().tolist() == [0, 10, 0, 100, 127, 127]  # >= 128 inverted
    assert ra.solarize(x, 256).equal(x) and ra.solarize(x, 0).equal(ra.invert(x))
    assert ra.solarize_add(clip_of([[100, 127, 128], [250, 0, 120]]), 30).flatten().tolist() == \
        [130, 157, 128, 250, 30, 150]  # only values < 128 get +30, capped at 255


def test_enhance_ops_truncate_like_pil():
    x = clip_of([[100, 200, 40], [255, 0, 0], [3, 7, 11]])
    assert ra.brightness(x, 0.5).flatten().tolist() == [50, 100, 20, 127, 0, 0, 1, 3, 5]  # 127.5 -> 127
    assert ra.brightness(x, 1.5).flatten().tolist() == [150, 255, 60, 255, 0, 0, 4, 10, 16]
    assert ra.brightness(x, 1.0).equal(x)
    # factor 0: PIL's L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16 in all three channels
    g = [(19595 * r + 38470 * gg + 7471 * b + 0x8000) >> 16 for r, gg, b in ([100, 200, 40], [255, 0, 0], [3, 7, 11])]
    assert g == [152, 76, 6]
    assert ra.color(x, 0.0).flatten().tolist() == [v for v in g for _ in range(3)]
    assert ra.color(x, 1.0).equal(x)
    # contrast: each frame's own mean L (frame 0 all 0 -> 0, frame 1 all 100 -> 100): per frame, as PIL
    two = torch.stack([torch.zeros(2, 2, 3, dtype=torch.uint8), torch.full((2, 2, 3), 100, dtype=torch.uint8)])
    assert ra.contrast(two, 0.0).equal(two)
    half = torch.tensor([[0, 0], [100, 101]], dtype=torch.uint8).view(1, 2, 2, 1).expand(1, 2, 2, 3).contiguous()
    # mean L = 50.25 -> int(50.75) = 50; factor 2: 50 + 2 (x - 50) = -50 -> 0, 150, 152
    assert ra.contrast(half, 2.0)[0, :, :, 0].tolist() == [[0, 0], [150, 152]]


def test_autocontrast_per_frame_and_channel():
    x = torch.zeros(2, 1, 3, 3, dtype=torch.uint8)
    x[0, 0, :, 0] = torch.tensor([55, 100, 140], dtype=torch.uint8)  # span 85: scale 3 -> 0, 135, 255
    x[0, 0, :, 1] = 77  # one level: unchanged
    x[0, 0, :, 2] = torch.tensor([60, 61, 122], dtype=torch.uint8)  # scale 255/62: int(4.1129...) = 4, 255
    x[1] = torch.tensor([10, 20, 30], dtype=torch.uint8).view(1, 3, 1)  # frame 1: its own range
    y = ra.autocontrast(x)
    assert y[0, 0, :, 0].tolist() == [0, 135, 255] and y[0, 0, :, 1].tolist() == [77] * 3
    assert y[0, 0, :, 2].tolist() == [0, 4, 255]
    assert y[1, 0, :, 0].tolist() == [0, 127, 255]  # 10 * 12.75 = 127.5 -> 127


def test_equalize_per_frame_hand_computed():
    # one frame, 765 pixels at levels 10 / 20 / 30 (255 each): step = (765 - 255) // 255 = 2,
    # lut[10] = (1 + 0) // 2 = 0, lut[20] = (1 + 255) // 2 = 128, lut[30] = (1 + 510) // 2 = 255.
    f = torch.tensor([10, 20, 30], dtype=torch.uint8).repeat_interleave(255).view(1, 15, 51, 1).expand(-1, -1, -1, 3)
    y = ra.equalize(torch.cat([f, torch.full_like(f, 40)]))
    assert y[0, 0, 0].tolist() == [0] * 3 and y[0, 5, 0].tolist() == [128] * 3 and y[0, -1, -1].tolist() == [255] * 3
    assert y[1].eq(40).all()  # frame 1 has one level: unchanged (statistics per frame)
    # a lut above 255 is capped as PIL's point does: 764 zeros and 2 ones -> step 2, lut[1] = 382 -> 255
    z = torch.zeros(1, 1, 766, 1, dtype=torch.uint8)
    z[0, 0, 764:] = 1
    assert ra.equalize(z).flatten()[-2:].tolist() == [255, 255]


def test_sharpness_hand_computed():
    x = torch.zeros(1, 5, 5, 1, dtype=torch.uint8)
    x[0, 2, 2, 0] = 255
    smooth = ra.sharpness(x, 0.0)[0, :, :, 0]  # PIL SMOOTH: 1 1 1 / 1 5 1 / 1 1 1 over 13, rounded; borders kept
    want = torch.zeros(5, 5, dtype=torch.uint8)
    want[1:4, 1:4] = 20  # 255 / 13 = 19.6 -> 20
    want[2, 2] = 98  # 1275 / 13 = 98.08
    assert smooth.equal(want)
    sharp = ra.sharpness(x, 2.0)[0, :, :, 0]  # 2 x - smooth: centre 412 -> 255, ring -20 -> 0
    assert sharp[2, 2] == 255 and sharp.sum() == 255
    assert ra.sharpness(x, 1.0).equal(x)


# ----------------------------------------------------------------------------- geometric ops
def test_translate_by_whole_pixels_moves_content_as_timm():
    x = _pattern()
    y = ra.translate_x(x, 2, FILL)  # output u reads input u + 2: content moves left
    assert y[:, :, :-2].equal(x[:, :, 2:])
    assert (y[:, :, -2:] == torch.tensor(FILL, dtype=torch.uint8)).all()
    y = ra.translate_y(x, -1, FILL)  # content moves down
    assert y[:, 1:].equal(x[:, :-1]) and (y[:, 0] == torch.tensor(FILL, dtype=torch.uint8)).all()
    # half a pixel: bilinear between neighbours, truncated (PIL)
    row = u8([10, 21, 40, 100], (1, 1, 4, 1))
    assert ra.translate_x(row, 0.5, (0,)).flatten().tolist() == [15, 30, 70, 0]  # last reads u = 4.0: outside, fill


def test_rotate_quarter_turns_and_centre():
    x = _pattern(h=6, w=6)
    # counter-clockwise on screen: the top-right corner goes to the top-left
    assert ra.rotate(x, 90, FILL).numpy().tolist() == np.rot90(x.numpy(), 1, axes=(1, 2)).tolist()
    assert ra.rotate(x, -90, FILL).numpy().tolist() == np.rot90(x.numpy(), -1, axes=(1, 2)).tolist()
    assert ra.rotate(x, 180, FILL).equal(x.flip(1).flip(2))
    assert ra.rotate(x, 0.0, FILL).equal(x)
    sym = torch.zeros(1, 5, 5, 1, dtype=torch.uint8)  # a plus sign about the centre pixel
    sym[0, 2, :, 0] = 200
    sym[0, :, 2, 0] = 200
    assert ra.rotate(sym, 90, (0,)).equal(sym)
    assert ra.rotate(sym, 30, (0,))[0, 2, 2, 0] == 200  # the centre stays


def test_shear_about_the_top_left_corner():
    x = torch.zeros(1, 3, 3, 1, dtype=torch.uint8)
    x[0, :, 0, 0] = 100  # the left column
    # output (u, v) reads input (u + v, v) in PIL's pixel-centre coordinates u = j + 0.5, v = i + 0.5
    y = ra.shear_x(x, 1.0, (9,))[0, :, :, 0]
    # row 0: u = 1, 2, 3 -> half-way between columns 0 and 1 (50), column 1 (0), outside (fill 9)
    assert y.tolist() == [[50, 0, 9], [0, 9, 9], [9, 9, 9]]
    assert ra.shear_x(x, 0.0, (9,)).equal(x) and ra.shear_y(x, 0.0, (9,)).equal(x)


# ----------------------------------------------------------------------------- the ops equal PIL's (what timm calls)
def test_ops_match_pil():
    Image = pytest.importorskip("PIL.Image")
    ImageOps = pytest.importorskip("PIL.ImageOps")
    ImageEnhance = pytest.importorskip("PIL.ImageEnhance")
    rng = np.random.default_rng(0)
    fill = ra.IMG_MEAN_FILL
    kw = dict(resample=Image.BILINEAR, fillcolor=fill)

    def pil(fn, frames):
        return np.stack([np.asarray(fn(Image.fromarray(f))) for f in frames])

    for trial in range(8):
        h, w = (int(v) for v in rng.integers(3, 17, 2))
        frames = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        if trial % 2:
            frames = (frames // 4 + 60).astype(np.uint8)  # a narrow range: autocontrast / equalize at work
        x = torch.from_numpy(frames)
        f, deg = float(rng.uniform(0.1, 1.9)), float(rng.uniform(-30, 30))
        sh, px = float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.45, 0.45)) * w
        bits, thr = trial % 4 + 1, int(rng.integers(0, 257))
        cases = {
            "autocontrast": (ra.autocontrast(x), ImageOps.autocontrast),
            "equalize": (ra.equalize(x), ImageOps.equalize),
            "posterize": (ra.posterize(x, bits), lambda i: ImageOps.posterize(i, bits)),
            "solarize": (ra.solarize(x, thr), lambda i: ImageOps.solarize(i, thr)),
            "color": (ra.color(x, f), lambda i: ImageEnhance.Color(i).enhance(f)),
            "contrast": (ra.contrast(x, f), lambda i: ImageEnhance.Contrast(i).enhance(f)),
            "brightness": (ra.brightness(x, f), lambda i: ImageEnhance.Brightness(i).enhance(f)),
            "sharpness": (ra.sharpness(x, f), lambda i: ImageEnhance.Sharpness(i).enhance(f)),
            "rotate": (ra.rotate(x, deg, fill), lambda i: i.rotate(deg, **kw)),
            "shear_x": (ra.shear_x(x, sh, fill), lambda i: i.transform(i.size, Image.AFFINE, (1, sh, 0, 0, 1, 0), **kw)),
            "shear_y": (ra.shear_y(x, sh, fill), lambda i: i.transform(i.size, Image.AFFINE, (1, 0, 0, sh, 1, 0), **kw)),
            "translate_x": (ra.translate_x(x, px, fill),
                            lambda i: i.transform(i.size, Image.AFFINE, (1, 0, px, 0, 1, 0), **kw)),
            "translate_y": (ra.translate_y(x, px, fill),
                            lambda i: i.transform(i.size, Image.AFFINE, (1, 0, 0, 0, 1, px), **kw)),
        }
        for name, (mine, ref) in cases.items():
            assert np.array_equal(mine.numpy(), pil(ref, frames)), (name, trial)


# ----------------------------------------------------------------------------- RandAugment
@pytest.mark.parametrize("ops", [RAND_TRANSFORMS, RAND_INCREASING_TRANSFORMS])
def test_same_ops_on_every_frame(ops):
    frame = _pattern(t=1, h=12, w=12, seed=3)
    clip = frame.expand(4, -1, -1, -1).contiguous()
    moving = _pattern(t=3, h=12, w=12, seed=4)  # different frames: each gets the same op as if alone
    aug = RandAugment(num_ops=3, magnitude=9, magnitude_std=0.5, prob=1.0, ops=ops)
    seen = set()
    for seed in range(40):
        plan = aug.draw(np.random.default_rng(seed))
        seen.update(op.name for op in plan)
        out = aug.apply(clip, plan)
        assert all(out[i].equal(out[0]) for i in range(4)), plan
        both = aug.apply(moving, plan)
        assert all(both[i].equal(aug.apply(moving[i:i + 1], plan)[0]) for i in range(3)), plan
    assert len(seen) >= 12  # most ops exercised


def test_seeded_and_type_preserving():
    clip = _pattern(t=3, h=9, w=11, seed=1).numpy()
    aug = RandAugment.from_string("rand-m9-n2-mstd0.5-p1.0")
    a = aug(clip, np.random.default_rng(5))
    b = aug(clip, np.random.default_rng(5))
    assert isinstance(a, np.ndarray) and a.dtype == np.uint8 and np.array_equal(a, b)
    outs = [aug(clip, np.random.default_rng(s)).tobytes() for s in range(10)]
    assert len(set(outs)) >= 8
    assert aug.draw(np.random.default_rng(5)) == aug.draw(np.random.default_rng(5))
    with pytest.raises(ValueError, match="uint8"):
        aug(clip.astype(np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="magnitude"):
        RandAugment(magnitude=-1)


def test_draw_statistics():
    aug = RandAugment(num_ops=1, magnitude=9, magnitude_std=0.5, prob=1.0)
    rng = np.random.default_rng(0)
    draws = [aug.draw(rng)[0] for _ in range(30000)]
    m = np.array([d.magnitude for d in draws])
    # clip(N(9, 0.5), 0, 10): mean 9 - 0.5 (phi(2) - 2 (1 - Phi(2))) = 8.9958, std about 0.48
    assert m.min() >= 0 and m.max() == 10.0 and abs((m == 10).mean() - 0.0228) < 0.005
    assert abs(m.mean() - 8.9958) < 0.015 and 0.46 < m.std() < 0.50
    counts = np.array([sum(d.name == o for d in draws) for o in RAND_TRANSFORMS])
    assert abs(counts - 2000).max() < 5 * np.sqrt(2000)  # uniform over timm's 15 ops
    signs = [d.sign for d in draws if d.name == "Rotate"]
    assert abs(np.mean(signs)) < 0.1
    assert all(d.sign == 1 for d in draws if d.name in ("Invert", "Color", "Posterize"))  # unsigned in timm
    assert all(d.magnitude == 9 for d in RandAugment(num_ops=4, magnitude_std=0, prob=1).draw(rng))
    half = RandAugment(num_ops=2, prob=0.5)
    applied = np.mean([len(half.draw(rng)) for _ in range(4000)])
    assert abs(applied - 1.0) < 0.05  # 2 ops x 0.5
    uni = RandAugment.from_string("rand-m8-n1-mstd200-p1")  # mstd > 100: uniform in [0, m]
    mu = np.array([uni.draw(rng)[0].magnitude for _ in range(4000)])
    assert mu.min() >= 0 and mu.max() <= 8 and abs(mu.mean() - 4) < 0.15
    big = RandAugment.from_string("rand-m15-n1-mstd0-mmax20-p1")
    assert big.draw(rng)[0].magnitude == 15  # mmax lifts the clip at 10
    assert RandAugment.from_string("rand-m15-n1-mstd0-p1").draw(rng)[0].magnitude == 10


def test_weighted_choice_without_replacement():
    aug = RandAugment.from_string("rand-m9-n4-mstd0.5-w0-p1")
    rng = np.random.default_rng(1)
    for _ in range(300):
        names = [d.name for d in aug.draw(rng)]
        assert len(names) == 4 == len(set(names)) and not {"Posterize", "Invert"} & set(names)  # weight 0
    with pytest.raises(ValueError, match="without replacement"):
        RandAugment.from_string("rand-n14-w0")  # only 13 ops have a weight


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


def test_config_key_takes_a_timm_string():
    from ivfast.probes.config import ConfigError, load_probe_config
    cfg = load_probe_config("classify", "configs/probes/probe_classify_ssv2.yaml",
                            ["backbone.source=random", "classify.data=synthetic"])
    assert cfg.classify.randaug and cfg.classify.randaug_timm == "rand-m9-n2-mstd0.5"
    aug = RandAugment.from_string(cfg.classify.randaug_timm)
    assert (aug.num_ops, aug.magnitude, aug.magnitude_std, aug.prob, aug.ops) == (2, 9.0, 0.5, 0.5, RAND_TRANSFORMS)
    with pytest.raises(ConfigError, match=r"classify.randaug_timm = 'rand-m9-x2': .*unknown section 'x2'"):
        load_probe_config("classify", None, ["backbone.source=random", "classify.randaug_timm=rand-m9-x2"])
