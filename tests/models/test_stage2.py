"""Stage-2 model on the tiny configs: losses, frozen/EMA teacher, loading a Stage-1 state dict."""
import os

import pytest
import torch
import torch.nn.functional as F

from ivfast.config import load_config
from ivfast.models.layers import DropPath
from ivfast.models.pos_embed import interpolate_time
from ivfast.models.predictor import predict_masked
from ivfast.rng import SampleRNG
from ivfast.training.optim import build_optimizer
from ivfast.training.step import draw_views
from tests.support import ROOT, stage1_model, stage2_model


def cfg_of(name, *overrides):
    return load_config(os.path.join(ROOT, "configs", f"{name}.yaml"), list(overrides))


@pytest.fixture(scope="module")
def stage1_state():
    torch.manual_seed(0)
    s1 = stage1_model(cfg_of("tiny"))  # 4 frames
    with torch.no_grad():  # make the learnable tables differ from sincos so interpolation is visible
        s1.encoder.pos.table.add_(0.1 * torch.randn_like(s1.encoder.pos.table))
        s1.predictor_pos.table.add_(0.1 * torch.randn_like(s1.predictor_pos.table))
    return s1.state_dict()


def tiny_stage2(stage1_state, *overrides):
    cfg = cfg_of("stage2_tiny", *overrides)
    torch.manual_seed(1)
    model = stage2_model(cfg)
    model.load_stage1(stage1_state)
    return cfg, model


def batch(cfg, model, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(b, 3, cfg.data.num_frames, cfg.data.img_size, cfg.data.img_size, generator=g)
    rng = SampleRNG(list(range(seed, seed + b)))
    views = draw_views(cfg, rng, model.encoder.grid)
    return video, [t for v in views for t in (v.visible_idx, v.masked_idx)]


def test_forward_shapes_and_finite_losses(stage1_state):
    cfg, model = tiny_stage2(stage1_state)
    video, args = batch(cfg, model)
    assert model.encoder.grid == (8, 4, 4) and model.teacher.grid == (8, 4, 4)
    assert model.encoder.return_layers == ()
    out = model(video, *args)
    assert list(out) == model.loss_names == ["loss", "loss_view0", "loss_view1"]
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    assert float(out["loss"].detach()) == pytest.approx(float(out["loss_view0"] + out["loss_view1"]), rel=1e-6)
    assert 0 < float(out["loss_view0"]) < 4 and 0 < float(out["loss_view1"]) < 4  # 2 - 2 cos in [0, 4]
    targets = model.teacher_targets(model.encoder.patchify(video), model.encoder.grid)
    assert targets.shape == (2, 8 * 16, 64)
    assert torch.allclose(targets.norm(dim=-1), torch.ones(2, 128), atol=1e-5)


def test_masks_of_the_config(stage1_state):
    cfg, model = tiny_stage2(stage1_state)
    rng = SampleRNG([5, 6, 7, 8])
    views = draw_views(cfg, rng, model.encoder.grid)
    again = draw_views(cfg, SampleRNG([5, 6, 7, 8]), model.encoder.grid)
    assert len(views) == 2
    for v, w in zip(views, again):
        assert torch.equal(v.mask, w.mask)
        assert v.mask.shape == (4, 128) and 1 <= v.num_visible <= cfg.model.stage2.max_visible


def test_teacher_is_frozen_gets_no_gradient_and_stays_in_eval(stage1_state):
    cfg, model = tiny_stage2(stage1_state)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert all(m.p == 0.0 for m in model.teacher.modules() if isinstance(m, DropPath))
    assert any(m.p > 0.0 for m in model.encoder.modules() if isinstance(m, DropPath))
    model.train()
    assert model.training and model.encoder.training and not model.teacher.training
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("teacher."))
    video, args = batch(cfg, model)
    model(video, *args)["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.head.fc2.weight.grad is not None and model.encoder.blocks[0].attn.qkv.weight.grad is not None
    opt.step()
    model.update_teacher(cfg.model.stage2.teacher_momentum)  # 1.0: nothing
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, enc_before[k]) for k, v in model.encoder.state_dict().items())


def test_ema_moves_the_teacher_towards_the_student(stage1_state):
    _, model = tiny_stage2(stage1_state)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.5)
    t0 = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    s = model.encoder.state_dict()
    model.update_teacher(1.0)
    assert all(torch.equal(v, t0[k]) for k, v in model.teacher.state_dict().items())
    model.update_teacher(0.75)
    for k, v in model.teacher.state_dict().items():
        assert torch.allclose(v, 0.75 * t0[k] + 0.25 * s[k], atol=1e-6), k
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_load_stage1_interpolates_4_to_8_frames_and_copies_into_the_teacher(stage1_state):
    cfg = cfg_of("stage2_tiny")
    model = stage2_model(cfg)
    report = model.load_stage1(stage1_state)
    sd = model.state_dict()
    assert set(report.interpolated) == {"encoder.pos.table", "predictor_pos.table"}
    assert report.interpolated["encoder.pos.table"] == (4, 8)
    for key in report.interpolated:
        old = stage1_state[key]
        expect = torch.cat([old[:4], interpolate_time(old[4:], 4, 8, 4, 4)])
        assert sd[key].shape == (4 + 8 * 16, 64)
        assert torch.allclose(sd[key], expect)
        assert torch.equal(sd[key][4:20], old[4:20])  # first frame kept (align_corners)
        assert torch.equal(sd[key][-16:], old[-16:])  # last frame kept
    for k, v in stage1_state.items():
        if k.startswith(("encoder.", "predictor.")) and k not in report.interpolated:
            assert torch.equal(sd[k], v), k
    assert torch.equal(sd["mask_token"], stage1_state["mask_token"])
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[k], v), k
    assert any(k.startswith("align_heads.") for k in report.ignored)
    assert any(k.startswith("diffloss.") for k in report.ignored)
    assert not report.unexpected
    assert report.kept and all(k.startswith("head.") for k in report.kept)


def test_same_frames_reuses_the_stage1_computation(stage1_state):
    """At Stage 1's frame count: teacher targets are Stage 1's last-block tokens, the predictor path is Stage 1's."""
    cfg1 = cfg_of("tiny", "model.encoder.drop_path=0.0")
    s1 = stage1_model(cfg1)
    s1.load_state_dict(stage1_state)
    s1.eval()
    cfg2 = cfg_of("stage2_tiny", "data.num_frames=4", "model.encoder.drop_path=0.0")
    model = stage2_model(cfg2)
    report = model.load_stage1(stage1_state)
    assert not report.interpolated
    model.eval()
    video, args = batch(cfg2, model, b=2)
    vis, msk = args[0], args[1]
    with torch.no_grad():
        expect = F.normalize(s1.encoder(video).patch_tokens, dim=-1)
        assert torch.allclose(model.teacher_targets(model.encoder.patchify(video), model.encoder.grid), expect,
                              atol=1e-6)
        enc = s1.encoder(video, vis)
        z1 = predict_masked(s1.predictor, s1.predictor_pos(), s1.mask_token, enc, vis, msk)
        z2 = predict_masked(model.predictor, model.predictor_pos(), model.mask_token, model.encoder(video, vis),
                            vis, msk)
    assert torch.allclose(z1, z2, atol=1e-6)


def test_load_stage1_errors(stage1_state):
    model = stage2_model(cfg_of("stage2_tiny"))
    partial = {k: v for k, v in stage1_state.items() if k != "encoder.blocks.0.attn.qkv.weight"}
    with pytest.raises(ValueError, match="encoder.blocks.0.attn.qkv.weight"):
        model.load_stage1(partial)
    no_predictor = {k: v for k, v in stage1_state.items() if not k.startswith(("predictor", "mask_token"))}
    with pytest.raises(ValueError, match="recon=none"):
        model.load_stage1(no_predictor)
    wide = stage2_model(cfg_of("stage2_tiny", "model.predictor.mlp_hidden=96"))
    with pytest.raises(ValueError, match="does not fit"):
        wide.load_stage1(stage1_state)
    bad_table = dict(stage1_state)
    bad_table["encoder.pos.table"] = torch.zeros(4 + 3 * 17, 64)
    with pytest.raises(ValueError, match="only the frame count may differ"):
        model.load_stage1(bad_table)
    extra = dict(stage1_state, **{"something.else": torch.zeros(1)})
    assert model.load_stage1(extra).unexpected == ["something.else"]


def test_loss_falls_on_a_fixed_batch(stage1_state):
    cfg, model = tiny_stage2(stage1_state, "model.encoder.drop_path=0.0")
    video, args = batch(cfg, model, b=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(8):
        loss = model(video, *args)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
