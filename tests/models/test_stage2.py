"""Stage-2 model on the tiny configs: losses, frozen/EMA teacher, loading a Stage-1 state dict,
position tables resampled per forward (the release) or at load."""

import pytest
import torch
import torch.nn.functional as F

from ivfast.files import save_safetensors
from ivfast.config import ConfigError, load_config, stage2_config
from ivfast.models.layers import DropPath
from ivfast.models.pos_embed import interpolate_time
from ivfast.models.stage2 import Stage2Model
from ivfast.models.predictor import predict_masked
from ivfast.rng import SampleRNG
from ivfast.training.optim import build_optimizer
from ivfast.training.step import draw_views
from tests.support import no_host_reads, stage1_model, stage2_model


@pytest.fixture(scope="module")
def stage1_state():
    torch.manual_seed(0)
    s1 = stage1_model(load_config("tiny"))  # 4 frames
    with torch.no_grad():  # make the learnable tables differ from sincos so interpolation is visible
        s1.encoder.pos.table.add_(0.1 * torch.randn_like(s1.encoder.pos.table))
        s1.predictor_pos.table.add_(0.1 * torch.randn_like(s1.predictor_pos.table))
    return s1.state_dict()


@pytest.fixture(scope="module")
def stage1_file(stage1_state, tmp_path_factory):
    """The Stage-1 state as a checkpoint file: stage2_config reads its table's time rows."""
    path = str(tmp_path_factory.mktemp("stage1") / "model.safetensors")
    save_safetensors(stage1_state, path)
    return path


def s2_cfg(stage1_file, *overrides):
    """configs/stage2_tiny.yaml (8 frames) started from the 4-frame Stage-1 file."""
    return load_config("stage2_tiny", [f"model.stage2.init_checkpoint={stage1_file}", *overrides])


def tiny_stage2(stage1_state, stage1_file, *overrides):
    cfg = s2_cfg(stage1_file, *overrides)
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


def test_forward_shapes_and_finite_losses(stage1_state, stage1_file):
    cfg, model = tiny_stage2(stage1_state, stage1_file)
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


def test_the_forward_never_waits_on_the_host(stage1_state, stage1_file, monkeypatch):
    """Masks are drawn before the call (Stage2Step.prepare): the forward, the teacher's targets
    included, reads no tensor back on the host."""
    cfg, model = tiny_stage2(stage1_state, stage1_file)
    video, args = batch(cfg, model)
    with no_host_reads(monkeypatch):
        out = model(video, *args)
    out["loss"].backward()


def test_masks_of_the_config(stage1_state, stage1_file):
    cfg, model = tiny_stage2(stage1_state, stage1_file)
    rng = SampleRNG([5, 6, 7, 8])
    views = draw_views(cfg, rng, model.encoder.grid)
    again = draw_views(cfg, SampleRNG([5, 6, 7, 8]), model.encoder.grid)
    assert len(views) == 2
    for v, w in zip(views, again):
        assert torch.equal(v.mask, w.mask)
        assert v.mask.shape == (4, 128) and 1 <= v.num_visible <= cfg.model.stage2.max_visible


def test_teacher_is_frozen_gets_no_gradient_and_stays_in_eval(stage1_state, stage1_file):
    cfg, model = tiny_stage2(stage1_state, stage1_file)
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


def test_ema_moves_the_teacher_towards_the_student(stage1_state, stage1_file):
    _, model = tiny_stage2(stage1_state, stage1_file)
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
    name, p = next(iter(model.encoder.named_parameters()))
    p.data = p.data.new_empty(0)  # what a sharded (ZeRO-3) parameter keeps locally
    with pytest.raises(RuntimeError, match=f"EMA teacher needs whole parameters; {name}"):
        model.update_teacher(0.75)


def test_load_stage1_interpolates_4_to_8_frames_and_copies_into_the_teacher(stage1_state, stage1_file):
    cfg = s2_cfg(stage1_file, "model.stage2.pos_resample=at_load")
    model = stage2_model(cfg)
    assert model.cfg.pos_frames == 0 and model.encoder.pos.table.shape == (4 + 8 * 16, 64)
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


def test_same_frames_reuses_the_stage1_computation(stage1_state, stage1_file):
    """At Stage 1's frame count: teacher targets are Stage 1's last-block tokens, the predictor path is Stage 1's."""
    cfg1 = load_config("tiny", ["model.encoder.drop_path=0.0"])
    s1 = stage1_model(cfg1)
    s1.load_state_dict(stage1_state)
    s1.eval()
    cfg2 = s2_cfg(stage1_file, "data.num_frames=4", "model.encoder.drop_path=0.0")
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


def test_load_stage1_errors(stage1_state, stage1_file):
    model = stage2_model(s2_cfg(stage1_file))
    partial = {k: v for k, v in stage1_state.items() if k != "encoder.blocks.0.attn.qkv.weight"}
    with pytest.raises(ValueError, match="encoder.blocks.0.attn.qkv.weight"):
        model.load_stage1(partial)
    no_predictor = {k: v for k, v in stage1_state.items() if not k.startswith(("predictor", "mask_token"))}
    with pytest.raises(ValueError, match="recon=none"):
        model.load_stage1(no_predictor)
    wide = stage2_model(s2_cfg(stage1_file, "model.predictor.mlp_hidden=96"))
    with pytest.raises(ValueError, match="does not fit"):
        wide.load_stage1(stage1_state)
    bad_table = dict(stage1_state)
    bad_table["encoder.pos.table"] = torch.zeros(4 + 3 * 17, 64)
    with pytest.raises(ValueError, match="only the frame count may differ"):
        model.load_stage1(bad_table)
    extra = dict(stage1_state, **{"something.else": torch.zeros(1)})
    assert model.load_stage1(extra).unexpected == ["something.else"]


def test_loss_falls_on_a_fixed_batch(stage1_state, stage1_file):
    cfg, model = tiny_stage2(stage1_state, stage1_file, "model.encoder.drop_path=0.0")
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


# -- position tables: per_forward (the release) ------------------------------------------


def release_rows(stored, t_new):
    """The release's expand_pos_embed in time: F.interpolate(mode='linear') with its default
    align_corners=False over the (t, h*w*D) stored patch rows, written independently."""
    t, hw_d = stored.shape[0], stored[0].numel()
    x = stored.reshape(t, hw_d).t()[None]  # (1, h*w*D, t)
    return F.interpolate(x, size=t_new, mode="linear", align_corners=False)[0].t().reshape(t_new, *stored.shape[1:])


def test_per_forward_keeps_the_stage1_rows_and_resamples_them_in_the_forward(stage1_state, stage1_file):
    cfg, model = tiny_stage2(stage1_state, stage1_file)
    assert cfg.model.stage2.pos_resample == "per_forward" and model.cfg.pos_frames == 4  # read from the file
    assert model.encoder.grid == (8, 4, 4)
    for key, table in {**model.pos_tables, "teacher.pos.table": model.teacher.pos}.items():
        stored = model.state_dict()[key]
        assert stored.shape == (4 + 4 * 16, 64) and table.grid == (4, 4, 4) and table.resample_time, key
        src = stage1_state[key.replace("teacher.", "encoder.")]
        assert torch.equal(stored, src), key  # loaded as is: nothing interpolated at load
        expect = release_rows(src[4:].reshape(4, 16, 64), 8).reshape(8 * 16, 64)
        torch.testing.assert_close(table.patch_rows_for(8, 4, 4), expect, rtol=0, atol=1e-6)
        at_load = interpolate_time(src[4:], 4, 8, 4, 4, align_corners=True)
        assert (expect - at_load).abs().max() > 0.01  # the two modes differ (not at the first and last frame)
    full = model.predictor_pos((8, 4, 4))
    assert torch.equal(full[:4], stage1_state["predictor_pos.table"][:4]) and full.shape == (4 + 8 * 16, 64)
    # the encoder adds the resampled rows, on the gathered (fused) path as on the full one
    video, args = batch(cfg, model)
    patches, vis = model.encoder.patchify(video), args[0]
    rows = model.encoder.pos.patch_rows_for(8, 4, 4)
    embedded = model.encoder.patch_embed(patches)
    torch.testing.assert_close(model.encoder.embed(patches, (8, 4, 4))[:, 4:], embedded + rows)
    gathered = model.encoder.embed(patches, (8, 4, 4), vis)[:, 4:]
    torch.testing.assert_close(gathered, torch.stack([embedded[b, vis[b]] + rows[vis[b]] for b in range(len(vis))]))


def test_per_forward_gradient_reaches_the_stored_rows(stage1_state, stage1_file):
    cfg, model = tiny_stage2(stage1_state, stage1_file)
    video, args = batch(cfg, model)
    model(video, *args)["loss"].backward()
    for table in model.pos_tables.values():
        assert table.table.grad is not None and table.table.grad[4:].abs().sum() > 0
    assert model.teacher.pos.table.grad is None
    # the gradient of the resampled rows is that of F.interpolate's, onto the 4 stored frames
    table = model.encoder.pos
    table.table.grad = None
    g = torch.randn(8 * 16, 64)
    (table.patch_rows_for(8, 4, 4) * g).sum().backward()
    leaf = table.table.detach()[4:].reshape(4, 16, 64).clone().requires_grad_(True)
    (release_rows(leaf, 8).reshape(8 * 16, 64) * g).sum().backward()
    torch.testing.assert_close(table.table.grad[4:], leaf.grad.reshape(4 * 16, 64), rtol=0, atol=1e-5)
    assert torch.all(table.table.grad[:4] == 0)


def test_a_per_forward_model_rebuilt_from_its_config_loads_its_own_state(stage1_state, stage1_file):
    cfg, model = tiny_stage2(stage1_state, stage1_file, "model.encoder.drop_path=0.0")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    video, args = batch(cfg, model)
    model(video, *args)["loss"].backward()
    opt.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    resumed = Stage2Model(stage2_config(cfg))  # what a resume builds before DeepSpeed loads its checkpoint
    resumed.load_state_dict(state)
    model.eval(), resumed.eval()
    with torch.no_grad():
        a, b = model(video, *args), resumed(video, *args)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pos_frames_errors_name_the_keys(stage1_state, stage1_file, tmp_path):
    unknown = stage2_model(load_config("stage2_tiny", ["model.stage2.init_checkpoint=no/such/run"]))
    assert unknown.cfg.pos_frames == 0 and unknown.encoder.pos.table.shape == (4 + 8 * 16, 64)
    with pytest.raises(ValueError, match=r"4 time rows.*stores 8.*pos_frames=4.*model.stage2.pos_resample=at_load"):
        unknown.load_stage1(stage1_state)
    mc = stage2_config(s2_cfg(stage1_file, "model.stage2.pos_resample=at_load"))
    mc.pos_frames = 3
    with pytest.raises(ValueError, match="needs pos_resample='per_forward'"):
        Stage2Model(mc)
    bad = dict(stage1_state, **{"encoder.pos.table": torch.zeros(4 + 3 * 17, 64)})
    path = str(tmp_path / "bad.safetensors")
    save_safetensors(bad, path)
    with pytest.raises(ConfigError, match="model.stage2.init_checkpoint.*encoder.pos.table"):
        stage2_config(s2_cfg(path))
    assert stage2_config(s2_cfg(path, "model.encoder.pos_learnable=false")).pos_frames == 0


def test_stage2_config_reads_the_time_rows_of_deepspeed_checkpoints(stage1_state, tmp_path):
    """ZeRO 0-2: the module file; ZeRO-3: rank 0's param_shapes (the tensors are not needed)."""
    for name, content in (("z1", {"module": stage1_state}),
                          ("z3", {"module": {}, "param_shapes": [{k: v.shape for k, v in stage1_state.items()}]})):
        tag = tmp_path / name / "checkpoints" / "step_00000001"
        tag.mkdir(parents=True)
        (tag / "ivfast_state.json").write_text("{}")
        file = "mp_rank_00_model_states.pt" if name == "z1" else "zero_pp_rank_0_mp_rank_00_model_states.pt"
        torch.save(content, str(tag / file))
        assert stage2_config(s2_cfg(str(tmp_path / name))).pos_frames == 4, name
