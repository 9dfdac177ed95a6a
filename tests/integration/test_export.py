"""Reading weights out of real tiny checkpoints (ZeRO-1 and ZeRO-3) and exporting the encoder."""
import os
import shutil
import subprocess

import pytest
import torch

from ivfast.checkpoint_io import CheckpointError, load_model_state, resolve_checkpoint
from ivfast.files import save_safetensors
from ivfast.config import load_config
from ivfast.export import load_exported_encoder, main
from tests.support import ROOT, TINY, export_model, run_env, stage1_model, stage2_model, train_cmd

STAGE2_TINY = os.path.join(ROOT, "configs", "stage2_tiny.yaml")


def start_train(out, *overrides, config=TINY):
    env = run_env(OMP_NUM_THREADS="1")  # two runs side by side
    return subprocess.Popen(train_cmd(out, ["train.max_steps=2", *overrides], config=config), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_all(procs):
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, stdout[-2000:] + stderr[-4000:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs, two at a time: Stage 1 (2 steps, same seed) with ZeRO-1 and ZeRO-3, then Stage 2 from
    the ZeRO-1 run (1 step, bf16: a frozen bf16 teacher and fp32 master weights) with ZeRO-1 and ZeRO-3."""
    base = tmp_path_factory.mktemp("runs")
    outs = {name: str(base / name) for name in ("z1", "z3", "s2z1", "s2z3")}
    wait_all({"z1": start_train(outs["z1"]), "z3": start_train(outs["z3"], "deepspeed.zero_stage=3")})
    s2 = [f"model.stage2.init_checkpoint={outs['z1']}", "train.precision=bf16", "train.max_steps=1",
          "data.batch_size=4"]
    wait_all({"s2z1": start_train(outs["s2z1"], *s2, config=STAGE2_TINY),
              "s2z3": start_train(outs["s2z3"], *s2, "deepspeed.zero_stage=3", config=STAGE2_TINY)})
    return outs


def tag_dir(run):
    return os.path.join(run, "checkpoints", "step_00000002")


def test_zero1_and_zero3_checkpoints_give_the_same_weights(runs):
    a, b = load_model_state(runs["z1"]), load_model_state(runs["z3"])
    model_keys = list(stage1_model(load_config(TINY)).state_dict())
    assert list(a) == list(b) == model_keys
    assert sorted(os.listdir(tag_dir(runs["z3"]))) == ["ivfast_state.json", "zero_pp_rank_0_mp_rank_00_model_states.pt",
                                                       "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    # After two optimiser steps the weights are no longer the initial ones.
    torch.manual_seed(0)
    init = stage1_model(load_config(TINY)).state_dict()
    assert any(not torch.allclose(init[k], a[k]) for k in a)


def test_master_weight_reconstruction_matches_the_module(runs):
    module = load_model_state(runs["z1"], master_weights=False)
    master = load_model_state(runs["z1"], master_weights=True)  # rebuilt from the ZeRO-1 fp32 partitions
    assert list(module) == list(master)
    for k in module:
        assert torch.equal(module[k], master[k]), k


def test_stage2_bf16_checkpoints_with_a_frozen_teacher(runs):
    from ivfast.models.pos_embed import interpolate_time

    stage1 = load_model_state(runs["z1"])
    a, b = load_model_state(runs["s2z1"]), load_model_state(runs["s2z3"])  # ZeRO-1 / ZeRO-3, bf16
    assert list(a) == list(b) == list(stage2_model(load_config(STAGE2_TINY)).state_dict())
    assert os.path.isfile(os.path.join(runs["s2z3"], "checkpoints", "step_00000001",
                                       "zero_pp_rank_0_mp_rank_00_model_states.pt"))
    for k in a:
        assert a[k].dtype == torch.float32
        if k.startswith("teacher."):  # frozen: ZeRO-3 keeps it as bf16 fragments, ZeRO-1 in the module
            src = stage1["encoder." + k[len("teacher."):]]
            if k == "teacher.pos.table" and a[k].shape != src.shape:  # at_load: 4 -> 8 frames at the start
                src = torch.cat([src[:4], interpolate_time(src[4:], 4, 8, 4, 4)])
            assert torch.equal(a[k], b[k]) and torch.equal(a[k], src.bfloat16().float()), k
        else:
            assert torch.allclose(a[k], b[k], atol=2e-3), k
    # ZeRO-1 bf16: trainable weights come from the fp32 master copy, the module holds their bf16 rounding.
    module = load_model_state(runs["s2z1"], master_weights=False)
    assert all(torch.equal(module[k], a[k].bfloat16().float()) for k in a)
    assert any(not torch.equal(module[k], a[k]) for k in a if k.startswith("encoder."))


def test_every_way_of_naming_a_checkpoint(runs, tmp_path):
    run = runs["z1"]
    ref = load_model_state(tag_dir(run))
    for path in (run, os.path.join(run, "checkpoints")):
        assert resolve_checkpoint(path) == ("deepspeed", tag_dir(run))
        got = load_model_state(path)
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    st = str(tmp_path / "model.safetensors")
    save_safetensors(ref, st)
    got = load_model_state(st)  # safetensors stores keys sorted
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_clear_errors(runs, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model_state(str(tmp_path / "nothing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_model_state(str(empty))
    (tmp_path / "w.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=".safetensors"):
        load_model_state(str(tmp_path / "w.pt"))
    # A save that never finished: no ivfast_state.json.
    ck = tmp_path / "run" / "checkpoints"
    shutil.copytree(tag_dir(runs["z3"]), ck / "step_00000004")
    os.remove(ck / "step_00000004" / "ivfast_state.json")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_model_state(str(ck))
    with pytest.raises(CheckpointError, match="incomplete"):
        load_model_state(str(ck / "step_00000004"))
    # A ZeRO-3 checkpoint missing its optimiser partition (the fp32 weights).
    shutil.copytree(tag_dir(runs["z3"]), ck / "step_00000006")
    os.remove(ck / "step_00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match="without optimiser files"):
        load_model_state(str(ck / "step_00000006"))
    # A rank missing: the optimiser says 1 partition, 2 are claimed by the file names.
    shutil.copytree(tag_dir(runs["z3"]), ck / "step_00000008")
    shutil.copy(ck / "step_00000008" / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                ck / "step_00000008" / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="ranks 0..0"):
        load_model_state(str(ck / "step_00000008"))
    # Files of two layouts in one directory.
    shutil.copytree(tag_dir(runs["z1"]), ck / "step_00000010")
    shutil.copy(os.path.join(tag_dir(runs["z3"]), "zero_pp_rank_0_mp_rank_00_model_states.pt"), ck / "step_00000010")
    with pytest.raises(CheckpointError, match="mixed layouts"):
        load_model_state(str(ck / "step_00000010"))
    # ZeRO-1 model file whose optimiser partitions are ZeRO-3's.
    shutil.copytree(tag_dir(runs["z1"]), ck / "step_00000012")
    shutil.copy(os.path.join(tag_dir(runs["z3"]), "zero_pp_rank_0_mp_rank_00_optim_states.pt"), ck / "step_00000012")
    with pytest.raises(CheckpointError, match="ZeRO-3"):
        load_model_state(str(ck / "step_00000012"), master_weights=True)


def test_export_gives_the_checkpoint_encoder_features(runs, tmp_path):
    out = str(tmp_path / "export")
    assert main([os.path.join(runs["z3"], "checkpoints"), out]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    # Both sides on the reference ops (the exported encoder's default), so features must be equal.
    cfg = load_config(os.path.join(runs["z3"], "config.yaml"), ["model.fused_kernels=false"])
    model = stage1_model(cfg)
    model.load_state_dict(load_model_state(runs["z3"]))
    model.eval()
    enc = load_exported_encoder(out)
    assert not enc.training and enc.grid == model.encoder.grid
    assert list(enc.state_dict()) == [k[len("encoder."):] for k in model.state_dict() if k.startswith("encoder.")]
    video = torch.randn(2, 3, cfg.data.num_frames, cfg.data.img_size, cfg.data.img_size)
    vis = torch.arange(0, 64, 3).expand(2, -1)
    with torch.no_grad():
        for idx in (None, vis):
            assert torch.equal(enc(video, idx).tokens, model.encoder(video, idx).tokens)


def test_full_export_round_trip(runs, tmp_path):
    out = str(tmp_path / "full")
    assert main([runs["z1"], out, "--full"]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "config.yaml", "model.safetensors",
                                       "stage1.safetensors"]
    ref = load_model_state(runs["z1"])
    full = load_model_state(os.path.join(out, "stage1.safetensors"))
    assert sorted(full) == sorted(ref) and all(torch.equal(full[k], ref[k]) for k in ref)
    # Exporting from the consolidated file finds its config beside it.
    again = str(tmp_path / "again")
    assert main([os.path.join(out, "stage1.safetensors"), again]) == 0
    a, b = load_exported_encoder(out), load_exported_encoder(again)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_hf_layout_round_trip(tmp_path):
    """A Stage-1 model state and its run config (no training run needed): config.json's fields, the
    model card and its license, and from_pretrained's features equal to the model's encoder's."""
    import json

    from ivfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from ivfast.export import from_pretrained
    from ivfast.models.pretrained import load_encoder_weights

    cfg = load_config(TINY, ["model.fused_kernels=false"])
    torch.manual_seed(0)
    model = stage1_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the initial values
    out = export_model(tmp_path, cfg, model, "hf")[1]
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    with open(os.path.join(out, "config.json")) as f:
        info = json.load(f)
    e = cfg.model.encoder
    assert info["format"] == "ivfast-encoder/2" and info["architecture"] == "VideoEncoder"
    assert (info["num_frames"], info["img_size"]) == (cfg.data.num_frames, cfg.data.img_size)
    assert (info["patch_size"], info["tubelet_size"], info["width"], info["depth"], info["heads"]) == (
        e.patch_size, e.tubelet_size, e.width, e.depth, e.heads)
    assert (info["mlp_ratio"], info["num_cls_tokens"], info["gelu"], info["block"]) == (
        e.mlp_ratio, e.num_cls_tokens, e.gelu, e.block)
    assert info["mean"] == list(IMAGENET_MEAN) and info["std"] == list(IMAGENET_STD)
    assert info["source"]["kind"] == "ivfast-run" and info["source"]["stage"] == 1
    card = open(os.path.join(out, "README.md")).read()
    assert card.startswith("---\nlicense: other\n") and "## License" in card and "declares no license" in card
    assert "from ivfast.export import from_pretrained" in card
    enc = from_pretrained(out)
    assert not enc.training and enc.grid == model.encoder.grid
    model.eval()
    video = torch.randn(2, 3, cfg.data.num_frames, cfg.data.img_size, cfg.data.img_size)
    vis = torch.arange(0, 64, 3).expand(2, -1)
    with torch.no_grad():
        for idx in (None, vis):
            assert torch.equal(enc(video, idx).tokens, model.encoder(video, idx).tokens)
    # model.init_from: the export into a fresh run's encoder (the Stage-1 step's call)
    fresh = stage1_model(cfg)
    report = load_encoder_weights(fresh.encoder, out)
    assert len(report.loaded) == len(fresh.encoder.state_dict()) and not report.interpolated
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in fresh.encoder.state_dict().items())


def test_stage2_export_takes_the_student_not_the_teacher(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "stage2_tiny.yaml"))
    model = stage2_model(cfg)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)  # the student differs from the teacher
    out = export_model(tmp_path, cfg, model, "out")[1]
    enc = load_exported_encoder(out, drop_path=0.0)
    assert enc.grid == (8, 4, 4)
    for k, v in enc.state_dict().items():
        want = model.encoder.state_dict()[k]
        if k == "pos.table" and want.shape != v.shape:  # per_forward: stored time rows, resampled at export
            want = stored_rows_at_clip_length(want, model.encoder)
        assert torch.equal(v, want), k
        assert v.shape != model.teacher.state_dict()[k].shape or not torch.equal(v, model.teacher.state_dict()[k]), k
    model.eval()
    video = torch.randn(2, 3, 8, 56, 56)
    with torch.no_grad():  # the tokens of the Stage-2 student at its clip length
        assert torch.equal(enc(video).tokens, model.encoder(video).tokens)
    # the probes' checkpoint backbone reads the same encoder out of the model state
    from ivfast.probes.config import BackboneConfig
    from ivfast.probes.features import load_encoder

    probe = load_encoder(BackboneConfig(source="checkpoint", checkpoint=str(tmp_path / "out_run" / "model.safetensors")))
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in probe.state_dict().items())


def stored_rows_at_clip_length(table, encoder):
    """A Stage-2 table's stored time rows resampled to the clip's (align_corners=False, per forward)."""
    from ivfast.models.pos_embed import interpolate_time

    n_cls, (t, h, w) = encoder.num_cls, encoder.grid
    rows = table.shape[0] - n_cls
    patch = interpolate_time(table[n_cls:], rows // (h * w), t, h, w, align_corners=False)
    return torch.cat([table[:n_cls], patch])


def test_stage2_run_export_is_the_student(runs, tmp_path):
    out = str(tmp_path / "s2")
    assert main([runs["s2z3"], out]) == 0
    enc = load_exported_encoder(out)
    state = load_model_state(runs["s2z3"])
    assert enc.grid == (8, 4, 4)
    for k, v in enc.state_dict().items():
        want = state["encoder." + k]
        if k == "pos.table" and want.shape != v.shape:  # per_forward: stored time rows, resampled at export
            want = stored_rows_at_clip_length(want, enc)
        assert torch.equal(v, want), k
    assert any(not torch.equal(v, state["teacher." + k]) for k, v in enc.state_dict().items() if k != "pos.table")


def test_export_errors(runs, tmp_path, capsys):
    assert main([str(tmp_path / "missing"), str(tmp_path / "o")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    # A config whose encoder does not match the weights.
    bad = os.path.join(ROOT, "configs", "stage2_tiny.yaml")
    assert main([runs["z1"], str(tmp_path / "o2"), "--config", bad]) == 1
    err = capsys.readouterr().err
    assert "do not fit" in err and "pos.table" in err
    assert not os.path.exists(tmp_path / "o2" / "encoder.safetensors")
    st = tmp_path / "lonely.safetensors"
    save_safetensors({"encoder.x": torch.zeros(1)}, str(st))
    assert main([str(st), str(tmp_path / "o3")]) == 1
    assert "pass --config" in capsys.readouterr().err
