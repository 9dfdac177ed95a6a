"""The temporally aware depth head (depth.head = temporal): shapes, mixing across frames, the
spatial head at initialisation, a tiny training run, the paper's configs."""
import json
import os

import numpy as np
import pytest
import torch

from ivfast.config import ConfigError
from ivfast.probes import depth
from ivfast.probes.config import load_probe_config
from ivfast.probes.features import load_encoder
from tests.support import ROOT

CFG = os.path.join(ROOT, "configs", "probes")


def _head(grid=(3, 3, 5), dim=16, patch=4, tubelet=2, temporal=True, seed=0):
    torch.manual_seed(seed)
    return depth.TemporalDepthHead(dim, grid, patch, tubelet, features=16, temporal_heads=2, temporal=temporal)


def _randomise_temporal_outputs(head):
    """Give the zero-initialised output maps of the temporal modules random weights."""
    torch.manual_seed(1)
    for m in head.temporal:
        torch.nn.init.normal_(m.proj_out.weight, std=0.2)
        torch.nn.init.normal_(m.proj_out.bias, std=0.2)


@pytest.mark.parametrize("grid,tubelet,out_hw", [((3, 3, 5), 2, (13, 17)), ((1, 1, 1), 1, (4, 4)),
                                                 ((5, 2, 3), 1, (8, 12))])
def test_shapes_odd_sizes(grid, tubelet, out_hw):
    head = _head(grid, tubelet=tubelet)
    t, h, w = grid
    y = head(torch.randn(2, t * h * w, 4 * 16), out_hw)
    assert y.shape == (2, t * tubelet, *out_hw) and (y > 0).all() and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="built for grid"):
        head(torch.randn(2, t * h * w + 1, 4 * 16), out_hw)


def test_equals_spatial_head_per_frame_at_init():
    """The temporal modules' output maps start at zero: the head is its spatial head, frame by frame."""
    head, spatial = _head(), _head(temporal=False)
    missing, unexpected = spatial.load_state_dict(head.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("temporal.") for k in unexpected)
    x = torch.randn(2, 3 * 3 * 5, 64)
    y = head(x, (12, 20))
    assert torch.allclose(y, spatial(x, (12, 20)), atol=1e-6)
    one = depth.TemporalDepthHead(16, (1, 3, 5), 4, 2, features=16, temporal_heads=2, temporal=False)
    one.load_state_dict(spatial.state_dict())
    frames = x.reshape(2, 3, 15, 64)
    per_frame = torch.cat([one(frames[:, i], (12, 20)) for i in range(3)], dim=1)
    assert torch.allclose(y, per_frame, atol=1e-6)


def test_temporal_modules_mix_frames():
    head = _head()
    _randomise_temporal_outputs(head)
    spatial = _head(temporal=False)
    spatial.load_state_dict(head.state_dict(), strict=False)
    x = torch.randn(1, 3 * 3 * 5, 64)
    x2 = x.clone()
    x2[:, :15] += torch.randn(1, 15, 64)  # time slot 0 (output frames 0, 1) perturbed
    with torch.no_grad():
        d_t = (head(x2, (12, 20)) - head(x, (12, 20))).abs().amax(dim=(0, 2, 3))
        d_s = (spatial(x2, (12, 20)) - spatial(x, (12, 20))).abs().amax(dim=(0, 2, 3))
    assert (d_t[:2] > 1e-4).all() and (d_t[2:] > 1e-4).all()  # every frame sees slot 0
    assert (d_s[:2] > 1e-4).all() and (d_s[2:] == 0).all()  # the spatial head does not


def test_temporal_module_positions_matter():
    """The sine-cosine frame positions break the symmetry of attention across time."""
    torch.manual_seed(0)
    m = depth.TemporalModule(8, heads=2)
    torch.nn.init.normal_(m.proj_out.weight, std=0.5)
    x = torch.randn(1, 8, 1, 2, 2).expand(1, 8, 4, 2, 2)  # the same map at every time step
    y = m(x)
    assert not torch.allclose(y[:, :, 0], y[:, :, 3], atol=1e-5)


def test_multi_layer_backbone_and_defaults():
    assert depth.default_layers(12) == [2, 5, 8, 11] and depth.default_layers(2) == [0, 0, 0, 1]
    cfg = load_probe_config("depth", os.path.join(CFG, "probe_depth_tiny.yaml"))
    enc = load_encoder(cfg.backbone)
    bb = depth.MultiLayerBackbone(enc, [0, 0, 1, -1])
    video = torch.randn(2, 3, 4, 32, 32)
    tok = bb(video)
    assert tok.shape == (2, 4 * 4 * 4, 4 * 64) and not tok.requires_grad
    assert torch.equal(tok[..., :64], tok[..., 64:128]) and torch.equal(tok[..., 128:192], tok[..., 192:])
    single = depth.FrozenBackbone(load_encoder(cfg.backbone), -1)(video)
    assert torch.allclose(tok[..., 192:], single, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        depth.MultiLayerBackbone(load_encoder(cfg.backbone), [0, 1, 2, 5])


def test_tiny_temporal_probe_trains(tmp_path):
    # lr 1e-3 here: without warm-up the tiny set's 8 windows make the paper's 3e-3 jumpy
    cfg = load_probe_config("depth", os.path.join(CFG, "probe_depth_tiny.yaml"),
                            [f"output_dir={tmp_path}", "progress=false", "depth.head=temporal", "max_steps=12",
                             "lr=1e-3", "min_lr=0", "depth.synthetic_videos=2", "save_every=100", f"feature_cache={tmp_path / 'cache'}"])
    out = depth.run(cfg)
    losses = out["losses"]
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3])  # 0.80 -> 0.38 at seed 0
    assert 0 <= out["eval"]["delta1"] <= 1 and out["eval"]["abs_rel"] >= 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["step"] == 12
    assert os.listdir(tmp_path / "cache") and all(d.startswith("depth_temporal_L0-0-0-1")
                                                  for d in os.listdir(tmp_path / "cache"))


def test_paper_configs():
    over = ["backbone.export_dir=x", "depth.train_dirs=[a]", "depth.val_dirs=[b]"]
    want = {"kitti": (128, 32, 10, 0.1, 80.0), "scannet": (256, 16, 5, 0.001, 10.0)}
    for name, (bs, win, stride, lo, hi) in want.items():
        for suffix, head in (("", "simple"), ("_temporal", "temporal")):
            cfg = load_probe_config("depth", os.path.join(CFG, f"probe_depth_{name}{suffix}.yaml"), over)
            d = cfg.depth
            assert (cfg.lr, cfg.batch_size, cfg.epochs) == (3e-3, bs, 30)
            assert (d.window, d.stride, d.min_depth, d.max_depth, d.head) == (win, stride, lo, hi, head)
            if head == "simple":
                assert d.width == 1536
            else:
                assert (d.layers, d.dpt_channels, d.dpt_features, d.temporal_heads) == ([], [], 128, 8)
    with pytest.raises(ConfigError, match="depth.head"):
        load_probe_config("depth", None, ["backbone.source=random", "depth.head=dpt"])
    with pytest.raises(ConfigError, match="depth.layers"):
        load_probe_config("depth", None, ["backbone.source=random", "depth.layers=[1,2]"])
