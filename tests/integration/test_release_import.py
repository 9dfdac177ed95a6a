"""Importing the authors' InternVideo-Next checkpoints (ivfast.models.release, ivfast-export --from-release).

The CI tests use the committed fixture (tests/fixtures/release/, written by
tools/make_release_fixture.py with the release's own model class): its import must give the
release model's stored outputs within 1e-5 (fp32). The parity tests at the end build the
release's class from a checkout and are skipped without ``IVFAST_RELEASE``.
"""
import argparse
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from ivfast.export import from_pretrained, main
from ivfast.models.encoder import VideoEncoder
from ivfast.models.pretrained import PretrainedError, load_encoder_weights, read_pretrained
from ivfast.models.release import (ReleaseCheckpointError, detect_release_kind, import_release_encoder,
                                   infer_encoder_kwargs, map_encoder, read_release_checkpoint)
from tests.support import ROOT

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "release")
ENCODER = os.path.join(FIXTURE, "encoder_tiny.safetensors")
TOL = 1e-5


@pytest.fixture(scope="module")
def fixture():
    with open(os.path.join(FIXTURE, "tiny.json")) as f:
        info = json.load(f)
    io = load_file(os.path.join(FIXTURE, "io_tiny.safetensors"))
    mean = torch.tensor(info["mean"], dtype=torch.float64).view(1, 3, 1, 1, 1)
    std = torch.tensor(info["std"], dtype=torch.float64).view(1, 3, 1, 1, 1)
    clip = ((io["clip_uint8"].double() / 255.0 - mean) / std).float()
    return dict(info=info, clip=clip, want=io["patch_tokens"], state=load_file(ENCODER))


def tiny_args(info):
    c = info["constructor"]
    return dict(heads=c["num_heads"], img_size=c["img_size"])


def encode(enc, clip):
    with torch.no_grad():
        return enc(clip).patch_tokens


def test_fixture_imports_to_the_release_outputs(fixture):
    state = read_release_checkpoint(ENCODER)
    assert detect_release_kind(state) == "encoder"
    kwargs = infer_encoder_kwargs(state, **tiny_args(fixture["info"]))
    c = fixture["info"]["constructor"]
    assert kwargs == dict(img_size=56, patch_size=14, num_frames=4, tubelet_size=1, in_chans=3, width=c["embed_dim"],
                          depth=2, heads=4, mlp_ratio=4.0, block="release", num_cls_tokens=4, layer_scale_init=1e-5,
                          drop_path=0.0, pos_learnable=True, gelu="tanh")
    mapped, consumed = map_encoder(state)
    assert sorted(set(state) - set(consumed)) == sorted(k for k in state if k.startswith("clip_projector."))
    enc = VideoEncoder(**kwargs).eval()
    assert sorted(enc.state_dict()) == sorted(mapped)
    enc.load_state_dict(mapped, strict=True)
    got = encode(enc, fixture["clip"])
    assert got.shape == fixture["want"].shape
    assert (got - fixture["want"]).abs().max().item() <= TOL


def test_from_release_cli_writes_the_hf_layout(fixture, tmp_path, capsys):
    out = str(tmp_path / "hf")
    c = fixture["info"]["constructor"]
    assert main(["--from-release", ENCODER, out, "--heads", "4", "--img-size", "56"]) == 0
    printed = capsys.readouterr().out
    assert "clip_projector" in printed and "model:" in printed
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["format"] == "ivfast-encoder/2" and cfg["architecture"] == "VideoEncoder"
    assert (cfg["num_frames"], cfg["img_size"], cfg["patch_size"], cfg["tubelet_size"]) == (4, 56, 14, 1)
    assert (cfg["width"], cfg["depth"], cfg["heads"], cfg["gelu"]) == (c["embed_dim"], 2, 4, "tanh")
    assert cfg["mean"] == fixture["info"]["mean"] and cfg["std"] == fixture["info"]["std"]
    assert cfg["license"] == "apache-2.0" and cfg["source"]["release_model"] == "encoder"
    assert cfg["not_imported"] == {"clip_projector": sum(k.startswith("clip_projector.") for k in fixture["state"])}
    card = open(os.path.join(out, "README.md")).read()
    assert "license: apache-2.0" in card and "Apache License 2.0" in card and "from_pretrained" in card
    enc = from_pretrained(out)
    assert not enc.training
    assert (encode(enc, fixture["clip"]) - fixture["want"]).abs().max().item() <= TOL


@pytest.mark.parametrize("change, named", [
    ("drop:blocks.1.attn.k_norm.weight", "blocks.1.attn.k_norm.weight"),
    ("drop:pos_embed", "pos_embed"),
    ("add:blocks.0.attn.qkv.bias", "blocks.0.attn.qkv.bias"),
    ("add:head.weight", "head.weight"),
    ("shape:blocks.0.mlp.fc2.bias", "blocks.0.mlp.fc2.bias"),
])
def test_a_missing_or_extra_key_stops_the_import(fixture, tmp_path, capsys, change, named):
    state = dict(fixture["state"])
    what, key = change.split(":")
    if what == "drop":
        del state[key]
    elif what == "add":
        state[key] = torch.zeros(state["blocks.0.attn.qkv.weight"].shape[0])
    else:
        state[key] = torch.zeros(state[key].shape[0] + 1)
    with pytest.raises(ReleaseCheckpointError, match=named.replace(".", r"\.")):
        import_release_encoder(state, **tiny_args(fixture["info"]))
    path = str(tmp_path / "bad.safetensors")
    save_file(state, path)
    out = tmp_path / "out"
    assert main(["--from-release", path, str(out), "--heads", "4", "--img-size", "56"]) == 1
    assert named in capsys.readouterr().err
    assert not out.exists()  # nothing written


def test_what_the_weights_do_not_say_is_asked_for(fixture):
    state = fixture["state"]
    with pytest.raises(ReleaseCheckpointError, match="give the head count"):
        infer_encoder_kwargs(state, img_size=56)
    with pytest.raises(ReleaseCheckpointError, match="give the frame count or image size"):
        infer_encoder_kwargs(state, heads=4)
    assert infer_encoder_kwargs(state, heads=4, num_frames=4)["img_size"] == 56
    with pytest.raises(ReleaseCheckpointError, match="do not fit"):
        infer_encoder_kwargs(state, heads=4, img_size=42)


def test_pickles_are_read_weights_only(fixture, tmp_path):
    state = {k: v.bfloat16() for k, v in fixture["state"].items()}
    # The release's own save layout ('model') and DeepSpeed's ('module' + plain extras), DDP prefixes.
    for name, obj in (("release.pth", {"model": state, "epoch": 3}),
                      ("mp_rank_00_model_states.pt", {"module": {f"module.{k}": v for k, v in state.items()},
                                                      "ds_version": "0.16", "global_steps": 10,
                                                      "param_shapes": [{"a": torch.Size([2])}]})):
        torch.save(obj, tmp_path / name)
        got = read_release_checkpoint(str(tmp_path / name))
        assert sorted(got) == sorted(state) and all(torch.equal(got[k], state[k]) for k in state)
    imp = import_release_encoder(got, **tiny_args(fixture["info"]))
    assert imp.source_dtypes == ["bfloat16"] and all(v.dtype == torch.float32 for v in imp.encoder_state.values())
    assert any("bfloat16" in n for n in imp.notes)
    # A pickle that needs a class (the release's save_model also pickles its argparse Namespace) is refused.
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "with_args.pth")
    with pytest.raises(ReleaseCheckpointError, match="weights-only"):
        read_release_checkpoint(str(tmp_path / "with_args.pth"))
    torch.save({"optimizer": {"lr": 1.0}}, tmp_path / "no_model.pth")
    with pytest.raises(ReleaseCheckpointError, match="no state dict"):
        read_release_checkpoint(str(tmp_path / "no_model.pth"))


def test_separable_position_table_becomes_the_joint_one(fixture):
    state = {k: v for k, v in fixture["state"].items() if k != "pos_embed"}
    d = state["cls_token"].shape[-1]
    g = torch.Generator().manual_seed(0)
    state["pos_embed_spatial"] = torch.randn(1, 16, d, generator=g)
    state["pos_embed_temporal"] = torch.randn(1, 4, d, generator=g)
    state["pos_embed_cls"] = torch.randn(1, 4, d, generator=g)
    kwargs = infer_encoder_kwargs(state, heads=4)  # the grid is in the separable tables
    assert (kwargs["num_frames"], kwargs["img_size"]) == (4, 56)
    table = map_encoder(state)[0]["pos.table"]
    assert torch.equal(table[:4], state["pos_embed_cls"][0])
    t, y, x = 2, 3, 1
    assert torch.allclose(table[4 + t * 16 + y * 4 + x],
                          state["pos_embed_spatial"][0, y * 4 + x] + state["pos_embed_temporal"][0, t])


def test_prefixed_and_training_checkpoints(fixture):
    state = {f"vision_encoder.{k}": v for k, v in fixture["state"].items()}
    imp = import_release_encoder(state, **tiny_args(fixture["info"]))
    assert imp.prefix == "vision_encoder." and imp.kind == "encoder"
    # A Stage-2 training model: the selfdist heads and the predictor are known parts, not imported.
    s2 = dict(fixture["state"], **{"selfdist_decoder.head.0.weight": torch.zeros(2, 2),
                                    "bert_decoder.layers.0.attn.Wqkv.weight": torch.zeros(2, 2),
                                    "diff_pos_embed": torch.zeros(1, 68, 32)})
    imp = import_release_encoder(s2, **tiny_args(fixture["info"]))
    assert imp.kind == "stage2" and "diff_pos_embed" in imp.not_imported
    with pytest.raises(ReleaseCheckpointError, match="neither Stage 1"):
        detect_release_kind({**fixture["state"], "bert_decoder.layers.0.x": torch.zeros(1)})


# ----------------------------------------------------------------------------- loading into a built encoder


@pytest.fixture
def hf_dir(tmp_path):
    out = str(tmp_path / "hf")
    assert main(["--from-release", ENCODER, out, "--heads", "4", "--img-size", "56"]) == 0
    return out


def test_init_from_resamples_time_and_stops_on_other_differences(fixture, hf_dir):
    kw = read_pretrained(hf_dir).kwargs
    torch.manual_seed(0)
    enc = VideoEncoder(**{**kw, "num_frames": 8, "drop_path": 0.1})
    report = load_encoder_weights(enc, hf_dir)
    assert report.interpolated == {"pos.table": (4, 8)} and len(report.loaded) == len(enc.state_dict())
    src = load_file(os.path.join(hf_dir, "model.safetensors"))
    table = enc.pos.table.detach()
    assert torch.equal(table[:4], src["pos.table"][:4])  # CLS rows kept
    assert torch.equal(table[4:20], src["pos.table"][4:20]) and torch.equal(table[-16:], src["pos.table"][-16:])
    assert torch.equal(enc.blocks[1].mlp.fc2.weight, src["blocks.1.mlp.fc2.weight"])
    for change, named in (({"depth": 3}, "depth"), ({"gelu": "erf"}, "gelu"), ({"img_size": 28}, "img_size"),
                          ({"num_cls_tokens": 1}, "num_cls_tokens"), ({"heads": 2}, "heads")):
        other = VideoEncoder(**{**kw, **change})
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(PretrainedError, match=named):
            load_encoder_weights(other, hf_dir)
        assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # untouched


def test_older_exports_stay_readable(fixture, hf_dir, tmp_path):
    import yaml

    from ivfast.export import FORMAT
    from ivfast.probes.config import BackboneConfig
    from ivfast.probes.features import load_encoder

    pre = read_pretrained(hf_dir)
    old = tmp_path / "old"
    old.mkdir()
    save_file(pre.state, str(old / "encoder.safetensors"))
    (old / "encoder.yaml").write_text(yaml.safe_dump({"format": FORMAT, "encoder": pre.kwargs,
                                                      "data": {"num_frames": 4, "img_size": 56}}))
    a, b = from_pretrained(str(old)), from_pretrained(hf_dir)
    assert torch.equal(encode(a, fixture["clip"]), encode(b, fixture["clip"]))
    enc = VideoEncoder(**pre.kwargs)
    assert load_encoder_weights(enc, str(old)).layout == "ivfast-encoder/1"
    for d in (str(old), hf_dir):
        probe = load_encoder(BackboneConfig(source="export", export_dir=d))
        assert (encode(probe, fixture["clip"]) - fixture["want"]).abs().max().item() <= TOL
    with pytest.raises(FileNotFoundError, match="no encoder export"):
        load_encoder(BackboneConfig(source="export", export_dir=str(tmp_path)))


# ----------------------------------------------------------------------------- parity with a checkout

RELEASE = os.environ.get("IVFAST_RELEASE", "")
needs_release = pytest.mark.skipif(not RELEASE, reason="IVFAST_RELEASE (an InternVideo-Next checkout) not set")


@needs_release
@pytest.mark.parametrize("variant", ["fused", "unfused", "separable"])
def test_parity_with_the_release_model(variant, tmp_path):
    """Random weights saved in the release's format by the release's own class; ivfast's import
    gives its forward's output within 1e-5 on the same clip (its forward takes no mask)."""
    from tests.release_stubs import build_release_encoder, fixed_clip, load_release_module

    warnings.simplefilter("ignore", FutureWarning)
    module = load_release_module(RELEASE)
    extra = dict(sep_pos_embed=True, cls_token_num=1) if variant == "separable" else {}
    model = build_release_encoder(module, fused=variant != "unfused", seed=3, **extra)
    clip = fixed_clip(seed=4)
    with torch.no_grad():
        want = model(clip)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "epoch": 0}, path)  # the release's save_model layout, minus args
    if variant == "unfused":  # the release's Mlp: exact GELU (the published models run the fused, tanh one)
        state = read_release_checkpoint(str(path))
        kw = {**infer_encoder_kwargs(state, heads=4, num_frames=4), "gelu": "erf"}
        enc = VideoEncoder(**kw).eval()
        enc.load_state_dict(map_encoder(state)[0], strict=True)
    else:
        out = str(tmp_path / "hf")
        assert main(["--from-release", str(path), out, "--heads", "4", "--frames", "4"]) == 0
        enc = from_pretrained(out)
    diff = (encode(enc, clip) - want).abs().max().item()
    print(f"release parity ({variant}): max abs diff {diff:.3g}, output max {want.abs().max().item():.3g}")
    assert diff <= TOL


@needs_release
def test_fixture_is_what_the_tool_makes(fixture, tmp_path):
    """The committed fixture is reproduced by tools/make_release_fixture.py from the checkout."""
    from tools.make_release_fixture import main as make

    assert make(["--out", str(tmp_path)]) == 0
    for name in ("encoder_tiny.safetensors", "io_tiny.safetensors"):
        a, b = load_file(str(tmp_path / name)), load_file(os.path.join(FIXTURE, name))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), name


# ----------------------------------------------------------------------------- a release Stage-1 model


def release_stage1_state(state: dict, num_cls: int) -> dict:
    """An ivfast Stage1Model state dict in the release's Stage-1 names (the inverse of the mapping
    tables of ivfast.models.release and ivfast.models.release_stage1)."""
    out = {}
    for k, v in state.items():
        if k.startswith("encoder."):
            name = k[len("encoder."):]
            if name == "patch_embed.proj.weight":
                d, n = v.shape
                p = int(round((n // 3) ** 0.5))
                out[name] = v.reshape(d, 3, 1, p, p)
            elif name == "patch_embed.norm_in.weight":
                p = int(round((v.numel() // 3) ** 0.5))
                out["patch_embed.norm_before.weight"] = v.reshape(3, 1, p, p).permute(1, 2, 3, 0).reshape(-1)
            elif name == "patch_embed.norm_out.weight":
                out["patch_embed.norm.weight"] = v
            elif name == "pos.table":
                out["pos_embed"] = v[None]
            else:
                out[name] = v
            continue
        head, _, rest = k.partition(".")
        mlp = {"fc1": "head.0", "fc2": "head.2", "norm": "norm"}
        if head == "align_heads":
            i, sub, kind = rest.split(".")
            out[f"clip_decoder.{i}.{mlp[sub]}.{kind}"] = v
        elif head == "align_pos":
            out["clip_pos_embed"] = torch.cat([torch.zeros(num_cls, v.shape[1]), v])[None]
        elif head == "pool":
            sub = rest.split(".")[0]
            name = {"norm_q": "norm1_q", "norm_k": "norm1_k", "norm_v": "norm1_v"}.get(sub)
            if name:
                out[f"clip_projector.{name}.{rest.split('.')[1]}"] = v
            elif sub == "proj":
                out[f"clip_projector.cross_attn.{rest}"] = v
            else:  # q/k/v weights and q_bias/k_bias/v_bias
                out[f"clip_projector.cross_attn.{rest}"] = v
        elif head == "final_head":
            sub, kind = rest.split(".")
            out[f"final_clip_decoder.{mlp[sub]}.{kind}"] = v
        elif k == "mask_token":
            out["bert_mask_token"] = v.reshape(1, 1, -1)
        elif head == "predictor_pos":
            out["diff_pos_embed"] = v[None]
        elif k.startswith("predictor.in_proj."):
            sub, kind = k.split(".")[2:]
            out[f"to_bert_proj.{mlp[sub]}.{kind}"] = v
        elif k.startswith("predictor.layers."):
            out["bert_decoder." + k[len("predictor."):]] = v
        elif head == "diffloss":
            out[k.replace(".norm.", ".in_ln.")] = v
        else:
            raise AssertionError(f"no release name for {k}")
    return out


def test_release_stage1_model_gives_the_encoder_and_the_whole_model(tmp_path, capsys):
    from ivfast.checkpoint_io import load_model_state
    from ivfast.config import load_config, stage1_config
    from ivfast.models.stage1 import Stage1Model
    from tests.support import stage1_model

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"))
    torch.manual_seed(0)
    model = stage1_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    want = model.state_dict()
    release = release_stage1_state(want, cfg.model.encoder.num_cls_tokens)
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": release, "ds_version": "0.16"}, path)  # the release's DeepSpeed save
    out = str(tmp_path / "s1")
    assert main(["--from-release", str(path), out, "--heads", "4", "--img-size", "56"]) == 0
    assert "release stage1" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "config.yaml", "model.safetensors",
                                       "stage1.safetensors"]
    got = load_model_state(os.path.join(out, "stage1.safetensors"))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    run_cfg = load_config(os.path.join(out, "config.yaml"))
    rebuilt = Stage1Model(stage1_config(run_cfg))
    rebuilt.load_state_dict(got, strict=True)
    enc = from_pretrained(out)
    assert all(torch.equal(v, want["encoder." + k]) for k, v in enc.state_dict().items())
    with open(os.path.join(out, "config.json")) as f:
        info = json.load(f)
    assert info["source"]["release_model"] == "stage1" and "stage1.safetensors" in info["files"]
    assert "stage1.safetensors" in open(os.path.join(out, "README.md")).read()
