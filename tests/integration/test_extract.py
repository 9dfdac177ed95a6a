"""``ivfast-extract`` (issue 18, point 2): features of a frozen export for a video list, per clip
and per sliding window, pooled or per token, to shards with a manifest; resumable; bad videos
named, skipped and not retried."""
import json
import os

import numpy as np
import pytest
import torch

from ivfast.extract import main, read_manifest
from ivfast.models.pretrained import from_pretrained, save_pretrained
from ivfast.probes.features import FrozenBackbone
from tests.clips import write_corrupt, write_video


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny export (4 frames of 32 px, patch 16, tubelet 2) and a list of three videos, the
    second corrupt: (export dir, list file, videos)."""
    from ivfast.models.encoder import VideoEncoder

    base = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    enc = VideoEncoder(img_size=32, patch_size=16, num_frames=4, tubelet_size=2, width=16, depth=2, heads=2,
                       num_cls_tokens=2, drop_path=0.0)
    export = str(base / "export")
    save_pretrained(enc, export, {"mean": [0.5] * 3, "std": [0.25] * 3})
    rng = np.random.default_rng(0)
    videos = [write_video(str(base / "a.mp4"), rng.integers(0, 255, (10, 48, 64, 3), dtype=np.uint8)),
              write_corrupt(str(base / "b.mp4")),
              write_video(str(base / "c.mp4"), rng.integers(0, 255, (6, 40, 40, 3), dtype=np.uint8))]
    lst = base / "list.txt"
    lst.write_text("".join(f"{v} {i}\n" for i, v in enumerate(videos)))
    return export, str(lst), videos


def _load(out, rec):
    if rec["shard"].endswith(".npy"):
        return torch.from_numpy(np.load(os.path.join(out, rec["shard"]))[rec["key"]])
    from safetensors.torch import load_file

    return load_file(os.path.join(out, rec["shard"]))[rec["key"]]


def test_windows_per_token_and_resume(setup, tmp_path, capsys):
    export, lst, videos = setup
    out = str(tmp_path / "feat")
    args = [lst, out, "--export", export, "--mode", "window", "--frames", "4", "--stride", "3", "--pool", "none",
            "--shard-size", "2", "--batch-size", "3"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].startswith(f"backbone: export {os.path.abspath(export)}")
    assert "cannot read video" in captured.err and videos[1] in captured.err
    lines = read_manifest(os.path.join(out, "manifest.jsonl"))
    good = [x for x in lines if "error" not in x]
    # a.mp4: 10 frames -> windows at 0, 3, 6 (the last ends at frame 10); c.mp4: 6 frames -> 0, then 2 (to the end)
    assert [(x["video"], x["start"], x["end"]) for x in good] == [
        (videos[0], 0, 4), (videos[0], 3, 7), (videos[0], 6, 10), (videos[2], 0, 4), (videos[2], 2, 6)]
    assert all(x["shape"] == [8, 16] for x in good)  # 2 x 2 x 2 tokens of width 16
    assert {x["shard"] for x in good} == {"shard_00000.safetensors", "shard_00001.safetensors"}  # a video never split
    summary = json.loads((tmp_path / "feat" / "summary.json").read_text())
    assert (summary["videos"], summary["videos_done"], summary["records"], summary["bad_videos"]) == (3, 2, 5, 1)
    assert summary["bad"][0]["video"] == videos[1] and summary["bad"][0]["reason"]

    # The features are the export's tokens of those frames.
    from ivfast.data.transforms import eval_transform
    from ivfast.data.video_list import load_clip

    frames = load_clip(videos[2], 6, None)[2:6]
    clip = eval_transform(frames, 32, mean=[0.5] * 3, std=[0.25] * 3)
    want = FrozenBackbone(from_pretrained(export))(clip[None])[0]
    assert torch.allclose(_load(out, good[-1]), want, atol=1e-5)

    # A rerun skips everything the manifest names (the bad video too); a lost tail is redone.
    assert main(args) == 0
    s2 = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (s2["skipped_done"], s2["records_now"], s2["bad_now"], s2["records"]) == (3, 0, 0, 5)
    path = os.path.join(out, "manifest.jsonl")
    kept = open(path).read().splitlines(keepends=True)
    with open(path, "w") as f:  # c.mp4's lines lost, and a torn line left by a crash
        f.write("".join(x for x in kept if videos[2] not in x) + '{"video": "tor')
    assert main(args) == 0
    s3 = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (s3["records_now"], s3["records"], s3["videos_done"], s3["bad_videos"]) == (2, 5, 2, 1)
    # Other settings in the same directory: refused.
    assert main([*args[:-4], "--pool", "mean"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_clips_pooled_npy(setup, tmp_path, capsys):
    export, lst, videos = setup
    out = str(tmp_path / "pooled")
    assert main([lst, out, "--export", export, "--pool", "cls", "--format", "npy"]) == 0
    good = [x for x in read_manifest(os.path.join(out, "manifest.jsonl")) if "error" not in x]
    assert [(x["video"], x["start"], x["key"], x["shape"]) for x in good] == [(videos[0], None, 0, [16]),
                                                                             (videos[2], None, 1, [16])]
    assert np.load(os.path.join(out, "shard_00000.npy")).shape == (2, 16)
    capsys.readouterr()
    assert main([lst, str(tmp_path / "x"), "--export", export, "--frames", "3"]) == 2  # not a multiple of tubelet 2
    err = capsys.readouterr().err
    assert "tubelet 2" in err and "--frames 3" in err and len(err.strip().splitlines()) == 1


def test_bad_video_not_retried_unless_asked(setup, tmp_path, capsys):
    export, _, _ = setup
    bad = write_corrupt(str(tmp_path / "v.mp4"))
    lst = tmp_path / "l.txt"
    lst.write_text(f"{bad}\n")
    out = str(tmp_path / "o")
    for _ in range(2):  # recorded once, then skipped
        assert main([str(lst), out, "--export", export]) == 0
    s = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (s["bad_videos"], s["bad_now"], s["skipped_done"]) == (1, 0, 1)
    write_video(bad, np.zeros((4, 32, 32, 3), np.uint8))  # repaired
    assert main([str(lst), out, "--export", export, "--retry-bad"]) == 0
    s = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (s["bad_videos"], s["videos_done"], s["records"]) == (0, 1, 1)
