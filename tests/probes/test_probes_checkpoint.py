"""Probe backbones from a real DeepSpeed training checkpoint, and the classify probe on video list files."""
import os

import numpy as np
import pytest
import torch

from ivfast.export import main as export_main
from ivfast.probes import classify
from ivfast.probes.config import BackboneConfig, load_probe_config
from ivfast.probes.features import FrozenBackbone, load_encoder
from tests.clips import write_corrupt, write_video
from tests.support import ROOT, run_train

CFG = os.path.join(ROOT, "configs", "probes")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A one-step Stage-1 run of configs/tiny.yaml (ZeRO-1, fp32): a real DeepSpeed checkpoint."""
    out = str(tmp_path_factory.mktemp("ckpt") / "run")
    run_train(out, ["train.max_steps=1", "train.save_every=1"], timeout=300)
    return out


def test_checkpoint_backbone_has_the_trained_encoder(run_dir, tmp_path):
    tag = os.path.join(run_dir, "checkpoints", "step_00000001")
    module = torch.load(os.path.join(tag, "mp_rank_00_model_states.pt"), map_location="cpu",
                        weights_only=True)["module"]
    want = {k[len("encoder."):]: v for k, v in module.items() if k.startswith("encoder.")}
    for path, run_config in ((run_dir, ""), (tag, os.path.join(run_dir, "config.yaml"))):
        enc = load_encoder(BackboneConfig(source="checkpoint", checkpoint=path, run_config=run_config))
        got = enc.state_dict()
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k].float()) for k in want)
        assert enc.width == 64 and enc.depth == 4 and enc.patch_size == 14
    # the same tokens as the ivfast-export of that checkpoint
    assert export_main([run_dir, str(tmp_path / "export")]) == 0
    x = torch.randn(2, 3, 4, 56, 56)
    a = FrozenBackbone(load_encoder(BackboneConfig(source="checkpoint", checkpoint=run_dir)))(x)
    b = FrozenBackbone(load_encoder(BackboneConfig(source="export", export_dir=str(tmp_path / "export"))))(x)
    assert a.shape == (2, 4 * 16, 64) and torch.equal(a, b)


def test_checkpoint_without_run_config_is_a_clear_error(run_dir, tmp_path):
    import shutil

    lone = tmp_path / "step_00000001"
    shutil.copytree(os.path.join(run_dir, "checkpoints", "step_00000001"), lone)
    with pytest.raises(FileNotFoundError, match="set backbone.run_config"):
        load_encoder(BackboneConfig(source="checkpoint", checkpoint=str(lone)))


def test_classify_probe_on_a_checkpoint_and_list_files(run_dir, tmp_path):
    """Video list files (one corrupt video), RandAug, repeated augmentation and 2 loader workers
    on a checkpoint backbone: trains, skips the unreadable clip, reports top-1 / top-5."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        frames = np.repeat(rng.integers(0, 256, (1, 48, 64, 3), dtype=np.uint8), 8, axis=0)
        write_video(str(tmp_path / f"v{i}.mp4"), frames)
        lines.append(f"v{i}.mp4 {i % 2}")
    write_corrupt(str(tmp_path / "bad.mp4"))
    (tmp_path / "train.txt").write_text("\n".join(lines + ["bad.mp4 1"]) + "\n")
    (tmp_path / "val.txt").write_text("\n".join(lines) + "\n")
    cfg = load_probe_config("classify", os.path.join(CFG, "probe_classify_tiny.yaml"), [
        f"output_dir={tmp_path / 'out'}", "progress=false", "backbone.source=checkpoint",
        f"backbone.checkpoint={run_dir}", "classify.data=list", f"classify.train_list={tmp_path / 'train.txt'}",
        f"classify.val_list={tmp_path / 'val.txt'}", f"classify.root={tmp_path}", "classify.num_classes=2",
        "classify.img_size=56", "classify.num_frames=4", "classify.randaug=true", "classify.repeated_aug=2",
        "batch_size=4", "num_workers=2", "max_steps=3", "eval_batch_size=4"])
    out = classify.run(cfg)
    assert out["step"] == 3 and all(np.isfinite(out["losses"]))
    assert out["eval"]["num_val"] == 4 and 0 <= out["eval"]["top1"] <= 100 and out["eval"]["top5"] == 100.0
