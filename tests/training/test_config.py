"""Config loading, overrides, saving and the one-line validation errors."""
import glob
import os

import pytest
import yaml

from ivfast.config import Config, ConfigError, chunking_allowed, load_config, save_config, to_dict
from tests.support import ROOT  # noqa: E402

TINY = os.path.join(ROOT, "configs", "tiny.yaml")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_paper_rows_share_everything_but_the_recon_head():
    rows = {n: load_config(os.path.join(ROOT, "configs", f"stage1_b_{n}.yaml")) for n in ("align", "linear", "diffusion")}
    assert [rows[n].model.recon for n in ("align", "linear", "diffusion")] == ["none", "linear", "diffusion"]
    for cfg in rows.values():
        assert (cfg.data.batch_size, cfg.data.num_frames, cfg.data.img_size, cfg.model.mask_ratio) == (16, 16, 224, 0.8)
        assert (cfg.model.encoder.width, cfg.model.encoder.depth, cfg.model.encoder.heads) == (768, 12, 12)
    large = load_config(os.path.join(ROOT, "configs", "stage1_l_diffusion.yaml"))
    assert (large.model.encoder.width, large.model.encoder.depth, large.model.encoder.heads) == (1024, 24, 16)
    assert large.model.encoder.mlp_ratio == 4.0  # inherited from the base file


def test_overrides_and_names():
    cfg = load_config(TINY, ["output_dir=runs/x", "train.max_steps=20", "model.mask_ratio=0.8",
                             "data.scales=[1.0, 0.5]", "train.lr=1e-4", "model.encoder.block=plain"])
    assert cfg.output_dir == "runs/x" and cfg.train.max_steps == 20 and cfg.model.mask_ratio == 0.8
    assert cfg.data.scales == [1.0, 0.5] and cfg.train.lr == 1e-4 and cfg.model.encoder.block == "plain"


def test_int_accepted_for_float_and_strings_kept_raw():
    cfg = load_config(TINY, ["train.lr=1", "output_dir=123"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.output_dir == "123"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(TINY, ["train.max_steps=7"])
    path = tmp_path / "config.yaml"
    save_config(cfg, str(path))
    again = load_config(str(path))
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load(path.read_text())["train"]["max_steps"] == 7


BAD = [
    (["model.mask_ratoi=0.5"], "unknown key 'model.mask_ratoi' (did you mean 'mask_ratio'?)"),
    (["train.max_steps=abc"], "train.max_steps: expected int, got str 'abc'"),
    (["train.max_steps=1.5"], "train.max_steps: expected int"),
    (["data.flip=3"], "data.flip: expected bool"),
    (["model.mask_ratio=1.0"], "model.mask_ratio = 1.0: must be in (0, 1)"),
    (["model.mask_ratio=0"], "model.mask_ratio = 0"),
    (["data.img_size=60"], "data.img_size = 60: must be a multiple of model.encoder.patch_size (14)"),
    (["model.encoder.tubelet_size=3"], "data.num_frames = 4: must be a positive multiple of model.encoder.tubelet_size (3)"),
    (["model.encoder.heads=5"], "model.encoder.heads = 5: must divide the width (64)"),
    (["model.predictor.heads=7"], "model.predictor.heads = 7: must divide the width (64)"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage = 4: must be 0, 1, 2 or 3"),
    (["deepspeed.zero_stage=-1"], "deepspeed.zero_stage = -1"),
    (["model.recon=vae"], "model.recon = 'vae': must be one of 'none' | 'linear' | 'diffusion'"),
    (["model.teacher.img_size=128"], "teacher grid 8 must equal the student grid 4"),
    (["data.source=list"], "data.list_file = '': is required when data.source is 'list'"),
    (["model.encoder=3"], "'model.encoder' is a section"),
    (["train.max_steps"], "is not of the form key=value"),
    (["model.align.num_layers=9"], "model.align.num_layers = 9"),
    (["model.stage=2"], "model.stage2.init_checkpoint = '': is required for Stage 2"),
    (["model.stage=3"], "model.stage = 3: must be one of 1 | 2"),
    (["model.stage2.teacher_momentum=0.99", "deepspeed.zero_stage=3"], "needs deepspeed.zero_stage 0-2"),
    (["model.teacher.weights=siglip.bin"], "model.teacher.weights = 'siglip.bin': must be a local .safetensors"),
    (["model.predictor.init_weights=mb.pt"], "model.predictor.init_weights = 'mb.pt': must be a local .safetensors"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_values_give_one_line_errors_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    text = str(err.value)
    assert "\n" not in text
    assert message in text


def test_bad_yaml_file_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("base: %s\nmodel:\n  encoder:\n    widht: 64\n" % TINY)
    with pytest.raises(ConfigError, match=r"unknown key 'model.encoder.widht' \(did you mean 'width'\?\)"):
        load_config(str(p))
    p.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_chunking_allowed_below_zero3_only():
    assert chunking_allowed(0) and chunking_allowed(2) and not chunking_allowed(3)
