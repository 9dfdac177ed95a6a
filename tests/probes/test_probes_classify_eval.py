"""The classify probe as the papers report it: multi-view testing (clips x crops, views
averaged) and several heads with their own lr / weight decay trained in one pass."""
import json
import os

import numpy as np
import pytest
import torch

from ivfast.config import ConfigError
from ivfast.data.transforms import eval_transform
from ivfast.data.video_list import VideoListDataset
from ivfast.probes import classify
from ivfast.probes.config import load_probe_config
from tests.clips import level_to_frame, write_corrupt, write_numbered_clip
from tests.probes.common import run_classify_killed
from tests.support import ROOT

CFG = os.path.join(ROOT, "configs", "probes")
TINY = os.path.join(CFG, "probe_classify_tiny.yaml")


def _cfg(tmp_path, name, *extra):
    return load_probe_config("classify", TINY, [f"output_dir={tmp_path / name}", "progress=false",
                                                "backbone.source=random", *extra])


def _json(path):
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- views
def test_crop_views_one_crop_is_the_eval_view_and_three_span_the_long_side():
    cols = np.arange(64, dtype=np.uint8) * 3
    frames = np.broadcast_to(cols[None, None, :, None], (2, 48, 64, 3)).copy()  # brighter to the right
    one = classify.crop_views(frames, 32, 1)
    assert one.shape == (1, 3, 2, 32, 32)
    assert torch.equal(one[0], eval_transform(frames, 32))
    three = classify.crop_views(frames, 32, 3)
    assert torch.equal(three[1], one[0])  # the middle crop is the centre crop
    m = three.mean(dim=(1, 2, 3, 4))
    assert m[0] < m[1] < m[2]  # left, centre, right
    assert classify.crop_offsets(43, 32, 32, 3) == [(0, 0), (5, 0), (11, 0)]  # portrait: along the height
    assert classify.crop_offsets(32, 43, 32, 2) == [(0, 0), (0, 11)]
    tall = classify.crop_views(np.ascontiguousarray(frames.transpose(0, 2, 1, 3)), 32, 3)  # rows brighter below
    mt = tall.mean(dim=(1, 2, 3, 4))
    assert mt[0] < mt[1] < mt[2]


def test_multiview_list_clips_split_each_segment(tmp_path):
    write_numbered_clip(str(tmp_path / "a.mp4"), num_frames=12)
    write_corrupt(str(tmp_path / "bad.mp4"))
    (tmp_path / "val.txt").write_text("a.mp4 1\nbad.mp4 0\n")
    base = VideoListDataset(str(tmp_path / "val.txt"), str(tmp_path), num_frames=2, size=32, flip=False, train=False)
    mv = classify.MultiViewClips(base, num_frames=2, clips=3, crops=2, size=32)
    item = mv[(0, 5)]
    assert item["video"].shape == (6, 3, 2, 32, 32) and item["label"] == 1 and item["index"] == 0
    # 12 frames, 2 segments of 6: clip k takes the middle of the k-th third of each segment
    mean, std = 0.485, 0.229  # channel 0 of the normalisation
    level = item["video"][:, 0].mean(dim=(-1, -2)) * std * 255 + mean * 255  # (views, frames)
    got = [[level_to_frame(float(x)) for x in v] for v in level]
    assert got == [[1, 7], [1, 7], [3, 9], [3, 9], [5, 11], [5, 11]]  # clip-major, 2 crops each
    single = classify.MultiViewClips(base, num_frames=2)[0]["video"]  # 1 x 1 = the single-view clip
    assert single.shape == (1, 3, 2, 32, 32) and torch.equal(single[0], base[0]["video"])
    assert mv[1] is None  # unreadable: skipped, named in the log


def test_multiview_synthetic_clips_are_consecutive_windows():
    from ivfast.data.synthetic import SyntheticClips

    long = SyntheticClips(3, num_frames=8, size=32, num_classes=4, flip=False, content_seed=1)
    short = SyntheticClips(3, num_frames=4, size=32, num_classes=4, flip=False, content_seed=1)
    item = classify.MultiViewClips(long, num_frames=4, clips=2, crops=3, size=32)[(2, 0)]
    assert item["video"].shape == (6, 3, 4, 32, 32) and item["label"] == 2
    assert torch.equal(item["video"][0], short[2]["video"])  # the first window is the single-view clip
    assert torch.equal(item["video"][3], long[2]["video"][:, 4:8])


def test_combine_views_softmax_or_logits():
    # view 0 is very sure of class 0; views 1 and 2 mildly prefer class 1
    logits = torch.tensor([[[12.0, 0.0], [0.0, 2.0], [0.0, 2.0]]])
    soft = classify.combine_views(logits, "softmax")
    mean = classify.combine_views(logits, "logits")
    assert soft.argmax(-1).item() == 1 and mean.argmax(-1).item() == 0
    assert torch.allclose(soft.sum(-1), torch.ones(1))
    with pytest.raises(ValueError, match="view average"):
        classify.combine_views(logits, "max")


# ----------------------------------------------------------------------------- heads
def test_sweep_grid_and_best_head(tmp_path):
    cfg = _cfg(tmp_path, "x", "lr=1e-3", "weight_decay=0.05")
    assert classify.sweep_settings(cfg) == [{"lr": 1e-3, "weight_decay": 0.05}]
    cfg = _cfg(tmp_path, "x", "classify.sweep.lr=[1e-3, 3e-3]", "classify.sweep.weight_decay=[0.0, 0.1]")
    assert classify.sweep_settings(cfg) == [{"lr": 1e-3, "weight_decay": 0.0}, {"lr": 1e-3, "weight_decay": 0.1},
                                            {"lr": 3e-3, "weight_decay": 0.0}, {"lr": 3e-3, "weight_decay": 0.1}]
    cfg = _cfg(tmp_path, "x", "classify.sweep.weight_decay=[0.0, 0.1]")
    assert [s["lr"] for s in classify.sweep_settings(cfg)] == [cfg.lr, cfg.lr]
    per = [{"top1": 50.0, "top5": 90.0}, {"top1": 75.0, "top5": 90.0}, {"top1": 75.0, "top5": 95.0},
           {"top1": 75.0, "top5": 95.0}]
    assert classify.best_head(per) == 2  # best top-1, then top-5, then the first
    heads = classify.ClassifyHeads(16, 2, 3, 2)
    groups = classify.sweep_groups(heads, [{"lr": 1e-3, "weight_decay": 0.0}, {"lr": 4e-3, "weight_decay": 0.2}], 2e-3)
    assert [(g["head"], g["lr_scale"], g["weight_decay"]) for g in groups] == [
        (0, 0.5, 0.0), (0, 0.5, 0.0), (1, 2.0, 0.2), (1, 2.0, 0.0)]
    assert heads(torch.randn(5, 7, 16)).shape == (2, 5, 3)
    old = classify.ClassifyHead(16, 2, 3)  # a single head's checkpoint loads as head 0
    one = classify.ClassifyHeads(16, 2, 3, 1)
    one.load_state_dict(old.state_dict())
    x = torch.randn(2, 7, 16)
    assert torch.equal(one(x)[0], old(x))


def test_config_keys_and_paper_defaults(tmp_path):
    with pytest.raises(ConfigError, match="classify.test_clips = 0"):
        _cfg(tmp_path, "x", "classify.test_clips=0")
    with pytest.raises(ConfigError, match="classify.sweep.lr"):
        _cfg(tmp_path, "x", "classify.sweep.lr=[1e-3, -1]")
    with pytest.raises(ConfigError, match="classify.sweep.weight_decay"):
        _cfg(tmp_path, "x", "classify.sweep.weight_decay=[0.1, 0.1]")
    with pytest.raises(ConfigError, match="classify.test_average"):
        _cfg(tmp_path, "x", "classify.test_average=max")
    c = _cfg(tmp_path, "x").classify
    assert (c.test_clips, c.test_crops, c.sweep.lr, c.sweep.weight_decay) == (1, 1, [], [])
    for name in ("ssv2", "k400", "coin"):
        cfg = load_probe_config("classify", os.path.join(CFG, f"probe_classify_{name}.yaml"),
                                ["backbone.export_dir=x", "classify.train_list=a", "classify.val_list=b"])
        c = cfg.classify
        assert (c.test_clips, c.test_crops, c.test_average) == (4, 3, "softmax")
        assert len(classify.sweep_settings(cfg)) > 1 and cfg.lr in c.sweep.lr


# ----------------------------------------------------------------------------- runs
COMMON = ["max_steps=6", "save_every=3", "classify.cutmix_prob=0.5", "classify.randaug=false",
          "classify.repeated_aug=1", "classify.synthetic_train=8", "classify.synthetic_val=4", "batch_size=4",
          "eval_batch_size=6", "lr=1e-3", "weight_decay=0.05"]


def test_several_heads_in_one_pass_match_single_runs(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = classify.tokens_for

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(classify, "tokens_for", counting)
    classify.run(_cfg(tmp_path, "sweep", *COMMON, "classify.sweep.lr=[1e-3, 3e-3]",
                              "classify.sweep.weight_decay=[0.05, 0.0]", "classify.test_clips=2",
                              "classify.test_crops=3"))
    assert calls["n"] == 6 + 4  # one backbone call per training step (4 heads), + 4 eval batches (1 video x 6 views)
    res = _json(tmp_path / "sweep" / "results.json")
    assert res["step"] == 6 and len(res["heads"]) == 4 and res["num_val"] == 4
    assert [(h["lr"], h["weight_decay"]) for h in res["heads"]] == [(1e-3, 0.05), (1e-3, 0.0), (3e-3, 0.05),
                                                                     (3e-3, 0.0)]
    best = res["best_head"]
    assert best == classify.best_head(res["heads"]) and res["top1"] == res["heads"][best]["top1"]
    assert (res["lr"], res["weight_decay"]) == (res["heads"][best]["lr"], res["heads"][best]["weight_decay"])
    assert res["test_views"] == {"clips": 2, "crops": 3, "average": "softmax"}
    lines = [x for x in map(json.loads, (tmp_path / "sweep" / "metrics.jsonl").read_text().splitlines()) if "loss" in x]
    assert len(lines) == 6
    assert len(lines[0]["head_losses"]) == 4 and lines[0]["loss"] == pytest.approx(sum(lines[0]["head_losses"]))
    # Head 0 (lr 1e-3, wd 0.05) is the single head of those values, trained alone.
    one = classify.run(_cfg(tmp_path, "one", *COMMON, "classify.test_clips=2", "classify.test_crops=3"))
    assert len(one["eval"]["heads"]) == 1 and one["eval"]["best_head"] == 0
    assert one["eval"]["top1"] == res["heads"][0]["top1"] and one["eval"]["top5"] == res["heads"][0]["top5"]
    assert [x["head_losses"][0] for x in lines] == pytest.approx(one["losses"], rel=1e-5)


def test_several_heads_resume_and_refuse_other_heads(tmp_path, monkeypatch):
    # cutmix off: its draws come from a generator the checkpoint does not hold (as in test_probes_loop)
    extra = [*COMMON, "classify.cutmix_prob=0.0", "classify.sweep.lr=[1e-3, 3e-3]", "classify.test_clips=2"]
    ref = classify.run(_cfg(tmp_path, "ref", *extra))
    run_classify_killed(monkeypatch, _cfg(tmp_path, "out", *extra))
    state = _json(tmp_path / "out" / "checkpoints" / "state.json")
    assert state["step"] == 3 and len(state["heads"]) == 2
    assert sorted({(g["head"], g["lr_scale"]) for g in state["param_groups"]}) == [(0, 1.0), (1, 3.0)]
    with pytest.raises(ValueError, match="cannot resume .* heads"):
        classify.run(_cfg(tmp_path, "out", *COMMON, "classify.sweep.lr=[1e-3, 1e-2]"))
    rest = classify.run(_cfg(tmp_path, "out", *extra))
    assert rest["step"] == 6 and rest["losses"] == pytest.approx(ref["losses"][3:], rel=1e-5)
    assert [h["top1"] for h in rest["eval"]["heads"]] == [h["top1"] for h in ref["eval"]["heads"]]


def test_multiview_eval_on_list_files_with_cache(tmp_path):
    lines = []
    for i in range(3):
        write_numbered_clip(str(tmp_path / f"v{i}.mp4"), num_frames=12, width=48, height=32)
        lines.append(f"v{i}.mp4 {i % 2}")
    write_corrupt(str(tmp_path / "bad.mp4"))
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "val.txt").write_text("\n".join(lines + ["bad.mp4 1"]) + "\n")
    cfg = _cfg(tmp_path, "list", "classify.data=list", f"classify.train_list={tmp_path / 'train.txt'}",
               f"classify.val_list={tmp_path / 'val.txt'}", f"classify.root={tmp_path}", "classify.num_classes=2",
               "classify.randaug=false", "classify.repeated_aug=1", "batch_size=2", "max_steps=2",
               "eval_batch_size=4", "classify.test_clips=2", "classify.test_crops=3", "classify.test_average=logits",
               f"feature_cache={tmp_path / 'cache'}")
    out = classify.run(cfg)
    assert out["eval"]["num_val"] == 3 and out["eval"]["test_views"]["average"] == "logits"
    cached = sorted(os.listdir(tmp_path / "cache" / "classify_val_2x3"))
    assert len(cached) == 3
    from safetensors.torch import load_file

    tok = load_file(str(tmp_path / "cache" / "classify_val_2x3" / cached[0]))["tokens"]
    assert tok.shape[0] == 6  # the tokens of the 6 views of one video


def test_classify_reads_frame_folders_with_its_template(tmp_path):
    """``classify.frame_template`` names the files of a folder of frames in a probe list
    (``dir start total label``); a template without one integer field stops at config load."""
    from PIL import Image

    d = tmp_path / "clip"
    d.mkdir()
    for i in range(1, 7):
        Image.fromarray(np.full((20, 24, 3), 20 * i, np.uint8)).save(d / f"frame-{i:03d}.png")
    lst = tmp_path / "val.txt"
    lst.write_text(f"{d} 1 6 3\n")
    cfg = load_probe_config("classify", None, ["classify.data=list", f"classify.train_list={lst}",
                                               f"classify.val_list={lst}", "classify.frame_template=frame-{:03d}.png",
                                               "backbone.source=random"])
    c = cfg.classify
    ds = VideoListDataset(c.val_list, c.root, 4, 16, flip=False, train=False, frame_template=c.frame_template)
    item = ds[0]
    assert item["video"].shape == (3, 4, 16, 16) and int(item["label"]) == 3
    with pytest.raises(ConfigError, match="classify.frame_template"):
        load_probe_config("classify", None, ["classify.frame_template=frames.png", "backbone.source=random"])
