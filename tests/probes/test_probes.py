"""Frozen-backbone probes: metrics, window rules, preprocessing errors, config, tiny training runs, CLI."""
import json
import math
import os

import numpy as np
import pytest
import torch
import yaml

from ivfast.config import ConfigError
from ivfast.probes import classify, depth, track
from ivfast.probes.config import ProbeConfig, TrackConfig, load_probe_config
from ivfast.probes.features import FeatureCache, FrozenBackbone, load_encoder
from ivfast.probes.loop import cosine_lr
from tests.support import ROOT  # noqa: E402

CFG = os.path.join(ROOT, "configs", "probes")


# ----------------------------------------------------------------------------- metrics
def test_topk_hand_computed():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0],   # label 1: top1 hit
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],   # label 4: rank 5 -> top5 hit only
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]])  # label 5: rank 6 -> miss
    r = classify.topk_accuracy(logits, torch.tensor([1, 4, 5]))
    assert r["top1"] == pytest.approx(100 / 3) and r["top5"] == pytest.approx(200 / 3)


def _depth_metrics(pred, gt, min_depth, max_depth):
    """AbsRel and delta1 of one prediction."""
    return depth.finish_depth_metrics(depth.depth_error_sums(torch.as_tensor(pred), torch.as_tensor(gt),
                                                             min_depth, max_depth))


def _write_depth_dir(path: str, frames: np.ndarray, depth: np.ndarray, fmt: str = "npy") -> None:
    """Write a video in the ``depth.read_depth_dir`` layout (frames as ``.npy`` or ``.png``)."""
    os.makedirs(os.path.join(path, "frames"), exist_ok=True)
    os.makedirs(os.path.join(path, "depth"), exist_ok=True)
    for i, (img, dm) in enumerate(zip(frames, depth)):
        if fmt == "npy":
            np.save(os.path.join(path, "frames", f"{i:06d}.npy"), img)
        else:
            import av

            with av.open(os.path.join(path, "frames", f"{i:06d}.png"), "w", format="image2") as c:
                s = c.add_stream("png")
                s.width, s.height, s.pix_fmt = img.shape[1], img.shape[0], "rgb24"
                for pkt in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                    c.mux(pkt)
                for pkt in s.encode():
                    c.mux(pkt)
        np.save(os.path.join(path, "depth", f"{i:06d}.npy"), dm)


def test_absrel_delta1_hand_computed():
    gt = torch.tensor([[1.0, 2.0], [4.0, 100.0]])  # 100 is out of [0.1, 80]: masked
    pred = torch.tensor([[1.2, 1.0], [4.0, 5.0]])
    r = _depth_metrics(pred, gt, 0.1, 80.0)
    assert r["num_pixels"] == 3
    assert r["abs_rel"] == pytest.approx((0.2 / 1 + 1.0 / 2 + 0) / 3)
    # ratios 1.2 (<1.25), 2.0 (no), 1.0 (yes)
    assert r["delta1"] == pytest.approx(2 / 3)


def test_depth_prediction_clamped_to_range():
    r = _depth_metrics(torch.tensor([0.0]), torch.tensor([0.5]), 0.1, 80.0)  # pred clamped to 0.1
    assert r["abs_rel"] == pytest.approx(0.8)


def test_iou_giou_hand_computed():
    a = torch.tensor([0.0, 0.0, 2.0, 2.0])
    b = torch.tensor([1.0, 1.0, 3.0, 3.0])
    assert track.box_iou(a, b).item() == pytest.approx(1 / 7)
    # enclosing box 3x3 = 9, union 7: GIoU = 1/7 - 2/9
    assert track.generalized_iou(a, b).item() == pytest.approx(1 / 7 - 2 / 9)
    c = torch.tensor([3.0, 0.0, 4.0, 1.0])  # disjoint: IoU 0, enclosing 4x2=8, union 5
    assert track.box_iou(a, c).item() == 0.0
    assert track.generalized_iou(a, c).item() == pytest.approx(-3 / 8)
    s, n = track.mean_iou(torch.stack([a, b])[None, None].expand(1, 1, 2, 4),
                          torch.stack([a, a])[None, None].expand(1, 2, 2, 4).clone(),
                          torch.tensor([[[True, True], [True, False]]]))
    assert n == 1 and s == pytest.approx(1.0)


def test_cosine_lr():
    assert cosine_lr(0, 10, 1.0, 0.0, 2) == pytest.approx(0.5)
    assert cosine_lr(2, 10, 1.0, 0.0, 2) == pytest.approx(1.0)
    assert cosine_lr(10, 10, 1.0, 0.1, 2) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- depth windows / reader
def test_window_starts_and_average():
    assert depth.window_starts(50, 16, 5) == [0, 5, 10, 15, 20, 25, 30, 34]
    assert depth.window_starts(32, 32, 10) == [0]
    with pytest.raises(ValueError, match="shorter than the depth window"):
        depth.window_starts(10, 16, 5)
    a = depth.average_windows([(0, torch.ones(3, 1, 1)), (2, 3 * torch.ones(3, 1, 1))], 5)
    assert a.flatten().tolist() == [1, 1, 2, 3, 3]


def test_depth_dir_roundtrip_and_wrong_size(tmp_path):
    fr, dm = depth.synthetic_depth_video(3, 16, 0)
    _write_depth_dir(str(tmp_path / "v"), fr, dm, fmt="png")
    f2, d2 = depth.read_depth_dir(str(tmp_path / "v"))
    assert np.array_equal(f2, fr) and np.array_equal(d2, dm)
    np.save(tmp_path / "v" / "depth" / "000001.npy", np.ones((8, 16), np.float32))
    with pytest.raises(ValueError, match=r"depth map is 8x16 but its frame is 16x16"):
        depth.read_depth_dir(str(tmp_path / "v"))


# ----------------------------------------------------------------------------- tracking rules
def _t(**kw):
    base = dict(window=16, stride=1, min_start_gap=3, min_objects=1, max_objects=25, min_presence=0.7,
                min_cooccur=10, max_gap=5)
    base.update(kw)
    return TrackConfig(**base)


def _frames(pattern: dict, n=16):
    """pattern: object id -> string of '1'/'0' per frame."""
    return [{oid: [0, 0, 1, 1] for oid, p in pattern.items() if p[i] == "1"} for i in range(n)]


def test_preprocess_resize_crop_remap():
    t = TrackConfig()  # 1280x1920 -> 224x336 -> crop 224 (x offset 56)
    out = track.preprocess_boxes({"a": [640, 320, 1280, 960]}, t)
    np.testing.assert_allclose(out["a"], [640 * 0.175 - 56, 56, 1280 * 0.175 - 56, 168])


def test_preprocess_clip_and_small_box():
    t = TrackConfig()
    out = track.preprocess_boxes({"edge": [0, 0, 640, 640], "left": [0, 0, 300, 600],
                                  "tiny": [900, 600, 960, 660], "ok": [900, 600, 1000, 700]}, t)
    np.testing.assert_allclose(out["edge"], [0, 0, 640 * 0.175 - 56, 112])  # clipped at the crop's left edge
    assert "left" not in out  # wholly in the cut-away margin: area 0 -> dropped
    # 0.5 % of 224^2 = 250.88 px: 60 px -> 10.5 px square = 110 px^2 dropped, 100 px -> 17.5^2 = 306 kept
    assert "tiny" not in out and "ok" in out


def test_box_outside_frame_is_error():
    with pytest.raises(ValueError, match="outside the 1920x1280 frame"):
        track.preprocess_boxes({"a": [1800, 10, 1930, 50]}, TrackConfig(), "video 0 frame 3: ")
    with pytest.raises(ValueError, match="outside"):
        track.preprocess_boxes({"a": [-1, 10, 30, 50]}, TrackConfig())


def test_fps_downsample():
    assert track.downsample(list(range(10)), 10, 5) == [0, 2, 4, 6, 8]


def test_rule_object_count():
    assert track.check_window(_frames({"a": "1" * 16}), 0, _t()) is None
    assert "first-frame objects" in track.check_window(_frames({"a": "0" + "1" * 15}), 0, _t())
    many = _frames({str(i): "1" * 16 for i in range(26)})
    assert "26 first-frame objects" in track.check_window(many, 0, _t())
    assert track.check_window(_frames({str(i): "1" * 16 for i in range(25)}), 0, _t()) is None


def test_rule_presence_70_percent():
    ok = "1" * 12 + "0101"  # 14/16 = 87.5 %
    assert track.check_window(_frames({"a": ok}), 0, _t(min_cooccur=0)) is None
    bad = "1100" * 4  # 8/16 = 50 %
    assert "present in 8/16" in track.check_window(_frames({"a": bad}), 0, _t(min_cooccur=0, max_gap=16))
    edge = "1" * 11 + "0" * 5  # 11/16 = 68.75 % < 70 %
    assert "present in 11/16" in track.check_window(_frames({"a": edge}), 0, _t(min_cooccur=0))


def test_rule_cooccurrence():
    a, b = "1" * 16, "1" * 12 + "0" * 4
    assert track.check_window(_frames({"a": a, "b": b}), 0, _t()) is None  # together in 12 >= 10
    a2 = "1" * 6 + "0" * 4 + "1" * 6  # 12/16, gap 4
    b2 = "1" * 16
    c2 = "1" * 8 + "11110000"  # 12/16, gap 4; all three together: frames 0-5 + 10-11 = 8 < 10
    assert "co-occur in 8 frames" in track.check_window(_frames({"a": a2, "b": b2, "c": c2}), 0, _t())


def test_rule_max_gap():
    ok = "1" * 11 + "0" * 5  # gap 5 allowed; presence 11/16 < 70% though -> use presence 0.6
    assert track.check_window(_frames({"a": ok}), 0, _t(min_presence=0.6, min_cooccur=0)) is None
    bad = "1" * 10 + "0" * 6  # gap 6
    assert "missing for 6" in track.check_window(_frames({"a": bad}), 0, _t(min_presence=0.6, min_cooccur=0))


def test_rule_start_gap_and_stride():
    frames = _frames({"a": "1" * 30}, 30)
    assert [s for s, _ in track.build_windows(frames, _t())] == [0, 3, 6, 9, 12]
    assert [s for s, _ in track.build_windows(frames, _t(min_start_gap=1))] == list(range(15))
    assert [s for s, _ in track.build_windows(frames, _t(stride=4, min_start_gap=1))] == [0, 4, 8, 12]


def test_empty_window_list_is_error():
    t = TrackConfig(src_height=64, src_width=96, resize_height=32, resize_width=48, crop=32, window=8,
                    min_cooccur=5)
    raw = [(np.zeros((20, 64, 96, 3), np.uint8), [{} for _ in range(20)], 10)]  # no objects at all
    with pytest.raises(ValueError, match="no window of 8 frames satisfies"):
        track.TrackWindows(raw, t, "train")


# ----------------------------------------------------------------------------- config
def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"^config error: depth.stride = 0: must be in \[1, depth.window\]$"):
        load_probe_config("depth", None, ["backbone.source=random", "depth.stride=0"])
    with pytest.raises(ConfigError, match=r"classify.randaug_magnitude = 11.0: must be in \[0, 10\]"):
        load_probe_config("classify", None, ["backbone.source=random", "classify.randaug=true",
                                             "classify.randaug_magnitude=11"])
    with pytest.raises(ConfigError, match=r"^config error: batch_size = 9: must be a multiple of classify.repeated"):
        load_probe_config("classify", None, ["backbone.source=random", "classify.repeated_aug=2", "batch_size=9"])
    with pytest.raises(ConfigError, match="not both"):
        load_probe_config("depth", None, ["backbone.source=random", "warmup_steps=5", "warmup_epochs=1"])
    with pytest.raises(ConfigError, match=r"warmup_epochs = 3.0: must be < epochs \(2\)"):
        load_probe_config("depth", None, ["backbone.source=random", "epochs=2", "warmup_epochs=3"])
    with pytest.raises(ConfigError, match="num_workers"):
        load_probe_config("depth", None, ["backbone.source=random", "num_workers=-1"])
    with pytest.raises(ConfigError, match="backbone.export_dir"):
        load_probe_config("track", None, [])
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        load_probe_config("track", None, ["lrr=1"])
    with pytest.raises(ConfigError, match="classify.layer_decay"):
        load_probe_config("classify", None, ["backbone.source=random", "classify.layer_decay=0.75"])
    for task in ("classify", "depth", "track"):
        load_probe_config(task, os.path.join(CFG, f"probe_{task}_tiny.yaml"))
    for name in ("ssv2", "k400", "coin"):  # the Table 5 recipes
        cfg = load_probe_config("classify", os.path.join(CFG, f"probe_classify_{name}.yaml"),
                                ["backbone.export_dir=x", "classify.train_list=a", "classify.val_list=b"])
        c = cfg.classify
        assert (c.randaug, c.randaug_magnitude, c.randaug_magnitude_std, c.repeated_aug) == (True, 9.0, 0.5, 2)
        assert (cfg.warmup_epochs, cfg.betas, c.label_smoothing, c.cutmix_prob, cfg.batch_size) == \
            (5, [0.9, 0.999], 0.1, 1.0, 1024)
        assert (cfg.lr, cfg.epochs, c.flip) == {"ssv2": (1e-3, 30, False), "k400": (3e-4, 20, True),
                                                "coin": (2e-4, 20, True)}[name]


# ----------------------------------------------------------------------------- backbone
def _tiny(tmp_path, task, *extra):
    cfg = load_probe_config(task, os.path.join(CFG, f"probe_{task}_tiny.yaml"),
                            [f"output_dir={tmp_path / task}", "progress=false", *extra])
    return cfg


def test_export_backbone_frozen_and_cached(tmp_path):
    from ivfast.files import save_safetensors
    from ivfast.export import FORMAT, build_encoder

    kw = dict(img_size=32, patch_size=8, num_frames=4, tubelet_size=1, in_chans=3, width=32, depth=2, heads=2,
              mlp_ratio=2.0, block="release", num_cls_tokens=1, layer_scale_init=1e-5, drop_path=0.0,
              pos_learnable=True)
    torch.manual_seed(0)
    enc = build_encoder(kw)
    save_safetensors(enc.state_dict(), str(tmp_path / "encoder.safetensors"))
    (tmp_path / "encoder.yaml").write_text(yaml.safe_dump({"format": FORMAT, "encoder": kw}))
    cfg = ProbeConfig()
    cfg.backbone.export_dir = str(tmp_path)
    bb = FrozenBackbone(load_encoder(cfg.backbone), layer=0)
    bb.train()
    assert not bb.encoder.training and not any(p.requires_grad for p in bb.parameters())
    x = torch.randn(3, 3, 4, 32, 32)
    tok = bb.extract(x, batch_size=2)
    assert tok.shape == (3, 16 * 4, 32)
    cache = FeatureCache(str(tmp_path / "cache"), "val")
    cache.put(7, tok[0])
    assert torch.equal(cache.get(7), tok[0]) and cache.get(8) is None


def test_layer_decay_groups():
    from ivfast.models.encoder import VideoEncoder

    enc = VideoEncoder(img_size=16, patch_size=8, num_frames=2, width=16, depth=3, heads=2, drop_path=0.0)
    groups = classify.layer_decay_groups(enc, 0.5, weight_decay=0.05, base_lr=1.0)
    by_id = {}
    for g in groups:
        by_id.setdefault(g["layer_id"], set()).add(g["lr_scale"])
        assert g["lr"] == g["lr_scale"]
        assert g["weight_decay"] == (0.0 if all(p.ndim <= 1 or n.endswith("bias")
                                                for p, n in zip(g["params"], g["names"])) else 0.05)
    assert by_id[0] == {0.5 ** 4} and by_id[1] == {0.5 ** 3} and by_id[3] == {0.5 ** 1}
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in enc.named_parameters())
    assert any(n.startswith("blocks.2") for g in groups if g["layer_id"] == 3 for n in g["names"])
    with pytest.raises(ValueError):
        classify.layer_decay_groups(enc, 0.0)


# ----------------------------------------------------------------------------- training runs
def _falls(losses, k=4):
    return np.mean(losses[-k:]) < np.mean(losses[:k])


def test_classify_trains(tmp_path):
    cfg = _tiny(tmp_path, "classify", "classify.cutmix_prob=0.0", "classify.flip=false", "classify.randaug=false",
                "classify.repeated_aug=1", "warmup_epochs=0",
                "classify.synthetic_train=8", "batch_size=8", "max_steps=25", "lr=3e-3",
                f"feature_cache={tmp_path / 'cache'}")
    out = classify.run(cfg)
    assert _falls(out["losses"]) and set(out["eval"]) >= {"top1", "top5"}
    assert len(os.listdir(tmp_path / "cache" / "classify_train")) == 8


def test_classify_cutmix_shapes():
    rng = np.random.default_rng(0)
    v = torch.arange(2.0).view(2, 1, 1, 1, 1).expand(2, 3, 2, 8, 8).clone()
    tgt = torch.eye(2)
    mixed, t2 = classify.cutmix(v, tgt, 1.0, rng)
    frac = (mixed[0] == 1).float().mean().item()  # pasted share of clip 0
    assert t2[0, 1].item() == pytest.approx(frac) and t2.sum(1).allclose(torch.ones(2))


def test_depth_trains(tmp_path):
    cfg = _tiny(tmp_path, "depth", "max_steps=20")
    out = depth.run(cfg)
    assert _falls(out["losses"])
    assert 0 <= out["eval"]["delta1"] <= 1 and out["eval"]["abs_rel"] >= 0


def test_track_trains_and_resumes(tmp_path):
    cfg = _tiny(tmp_path, "track", "max_steps=16", "save_every=8")
    out = track.run(cfg)
    assert _falls(out["losses"]) and 0 <= out["eval"]["mean_iou"] <= 1
    state = json.loads((tmp_path / "track" / "checkpoints" / "state.json").read_text())
    assert state["step"] == 16
    cfg2 = _tiny(tmp_path, "track", "max_steps=20", "save_every=8")
    out2 = track.run(cfg2)
    assert out2["step"] == 20 and len(out2["losses"]) == 4  # resumed at 16
    lines = [json.loads(x) for x in (tmp_path / "track" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["eval"]["mean_iou"] == out2["eval"]["mean_iou"]


def test_cli_end_to_end(tmp_path, capsys):
    from ivfast.probes.cli import main

    rc = main(["depth", "--config", os.path.join(CFG, "probe_depth_tiny.yaml"), f"output_dir={tmp_path}",
               "max_steps=3", "progress=false"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["task"] == "depth" and res["step"] == 3 and math.isfinite(res["abs_rel"])
    assert (tmp_path / "results.json").exists() and (tmp_path / "config.yaml").exists()
    assert main(["depth", "--config", os.path.join(CFG, "probe_depth_tiny.yaml"), "depth.window=0"]) == 2
    assert "depth.window" in capsys.readouterr().err


def test_track_json_reader(tmp_path):
    t = TrackConfig(src_height=64, src_width=96, resize_height=32, resize_width=48, crop=32, window=8,
                    min_cooccur=5, max_gap=2)
    frames, boxes = track.synthetic_track_video(40, t, 3)
    os.makedirs(tmp_path / "v0")
    for i, f in enumerate(frames):
        np.save(tmp_path / "v0" / f"{i:06d}.npy", f)
    ann = {"videos": [{"frames_dir": "v0", "height": 64, "width": 96, "fps": 10, "boxes": boxes}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    raw = [(track._load_frames(v["frames_dir"]), v["boxes"], v["fps"]) for v in track.read_annotations(str(tmp_path / "ann.json"))]
    ds = track.TrackWindows(raw, t, "val")
    video, first, bx, present, objects = ds[0]
    assert video.shape == (3, 8, 32, 32) and bx.shape == (8, 25, 4) and present[0, objects].all()
    assert ds.samples[0][1] == 0 and all(b - a >= 3 for a, b in zip([s for _, s, _ in ds.samples], [s for _, s, _ in ds.samples][1:]))
