"""A probe runs on the backbone it is given (issue 18, point 6): naming an export or a checkpoint
selects it, the log names it, and clips that do not fit it are adapted or stopped in one line."""
import json
import os

import pytest
import torch

from ivfast.config import load_config
from ivfast.models.pretrained import from_pretrained
from ivfast.probes import classify, depth, track
from ivfast.probes import cli as probe_cli
from ivfast.probes.cli import main as probe_main
from ivfast.probes.config import BackboneConfig, ConfigError, load_probe_config, resolve_backbone
from ivfast.probes.features import BackboneMismatch, FrozenBackbone, load_backbone
from tests.support import ROOT, export_model, stage1_model

CFG = os.path.join(ROOT, "configs", "probes")
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
TASK = {"classify": classify, "depth": depth, "track": track}


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """``ivfast-export`` of configs/tiny.yaml's Stage-1 model (what `make train` trains: 4 frames of
    56 px, patch 14), its state saved as a run: (run dir, export dir)."""
    cfg = load_config(TINY)
    torch.manual_seed(1)
    return export_model(tmp_path_factory.mktemp("tiny"), cfg, stage1_model(cfg), "exported")


# ----------------------------------------------------------------------------- the rule
def test_selection_rule():
    assert resolve_backbone(BackboneConfig(source="random")) == ("random", "")
    assert resolve_backbone(BackboneConfig(export_dir="e")) == ("export", "")  # auto
    assert resolve_backbone(BackboneConfig(checkpoint="c")) == ("checkpoint", "")
    src, note = resolve_backbone(BackboneConfig(source="random", export_dir="e"))  # the named one wins
    assert src == "export" and "backbone.source = 'random' set aside" in note
    src, note = resolve_backbone(BackboneConfig(source="export", checkpoint="c"))
    assert src == "checkpoint" and "set aside" in note
    assert resolve_backbone(BackboneConfig(source="checkpoint", export_dir="e", checkpoint="c"))[0] == "checkpoint"
    with pytest.raises(ConfigError, match="are both named: keep one"):
        resolve_backbone(BackboneConfig(export_dir="e", checkpoint="c"))
    with pytest.raises(ConfigError, match=r"^config error: backbone.export_dir = '': name the backbone"):
        load_probe_config("classify", None, [])
    with pytest.raises(ConfigError, match="backbone.checkpoint"):
        load_probe_config("classify", None, ["backbone.source=checkpoint"])
    cfg = load_probe_config("track", os.path.join(CFG, "probe_track_tiny.yaml"), ["backbone.export_dir=x"])
    assert resolve_backbone(cfg.backbone)[0] == "export"


def test_fit_adapts_or_stops_in_one_line():
    from ivfast.models.encoder import VideoEncoder

    enc = VideoEncoder(img_size=28, patch_size=14, num_frames=4, tubelet_size=2, width=16, depth=1, heads=2,
                       num_cls_tokens=1, drop_path=0.0)
    bb = FrozenBackbone(enc)
    assert bb.fit(4, 28, 28) == []
    notes = bb.fit(8, 32, 32, "classify clips (classify.num_frames=8)")
    assert any("resized to 28x28" in n for n in notes) and any("2 -> 4 time steps" in n for n in notes)
    assert bb.grid(8, 32, 32) == (4, 2, 2)
    assert bb(torch.randn(2, 3, 8, 32, 32)).shape == (2, 16, 16)
    assert bb(torch.randn(1, 3, 4, 28, 28)).shape == (1, 8, 16)  # back to its own length, from its own rows
    assert torch.equal(bb.encoder.pos.table, bb.pos_rows)
    with pytest.raises(BackboneMismatch) as e:
        bb.fit(5, 28, 28, "depth windows (depth.window=5)")
    msg = str(e.value)
    assert "\n" not in msg and "depth.window=5" in msg and "tubelet 2" in msg and "4 frames x 28x28 px" in msg
    strict = FrozenBackbone(enc, adapt=False)
    with pytest.raises(BackboneMismatch, match="frame size differs"):
        strict.fit(4, 32, 32)


# ----------------------------------------------------------------------------- make train's export
@pytest.mark.parametrize("task", ["classify", "depth", "track"])
def test_tiny_probes_run_on_the_export(task, tiny_export, tmp_path, monkeypatch, capsys):
    """The issue's command: the tiny config with backbone.export_dir= runs on the export (not a
    random encoder), says so first, and fits its 32 px clips to the export's 56 px."""
    _, out = tiny_export
    seen = []  # the encoders the probe runs on: loaded once, by the CLI, and handed to the task's run
    real = probe_cli.load_backbone

    def spy(b):
        enc, info = real(b)
        seen.append(enc)
        return enc, info

    monkeypatch.setattr(probe_cli, "load_backbone", spy)
    monkeypatch.setattr(TASK[task], "load_encoder", lambda b: pytest.fail("the backbone was loaded twice"))
    rc = probe_main([task, "--config", os.path.join(CFG, f"probe_{task}_tiny.yaml"), f"backbone.export_dir={out}",
                     f"output_dir={tmp_path / task}", "max_steps=2", "progress=false"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    lines = stdout.splitlines()
    assert lines[0] == f"backbone: export {os.path.abspath(out)} (ivfast-encoder/2)"
    assert lines[1].startswith("backbone: note: backbone.source = 'random' set aside")
    assert "VideoEncoder width 64, depth 4" in lines[2] and "4 frames x 56 px" in lines[2]
    assert "resized to 56x56 px" in stdout
    assert json.loads(lines[-1])["step"] == 2
    ref = from_pretrained(out).state_dict()
    state = seen[0].state_dict()
    assert set(state) == set(ref)
    for k in ref:
        if k != "pos.table" or state[k].shape == ref[k].shape:
            assert torch.equal(state[k], ref[k]), k
    rec = json.loads((tmp_path / task / "backbone.json").read_text())
    assert rec["source"] == "export" and rec["parameters"] == sum(v.numel() for v in ref.values())


def test_checkpoint_named_on_the_command_line_wins(tiny_export, tmp_path, capsys):
    run, out = tiny_export
    enc, info = load_backbone(BackboneConfig(source="random", checkpoint=os.path.join(run, "model.safetensors")))
    assert info["source"] == "checkpoint" and info["run_config"].endswith("config.yaml")
    ref = from_pretrained(out).state_dict()
    assert all(torch.equal(enc.state_dict()[k], ref[k]) for k in ref)
    rc = probe_main(["classify", "--config", os.path.join(CFG, "probe_classify_tiny.yaml"), f"backbone.checkpoint={run}/model.safetensors",
                     f"backbone.export_dir={out}", f"output_dir={tmp_path}", "max_steps=1"])
    assert rc == 2 and "are both named" in capsys.readouterr().err
    rc = probe_main(["classify", "--config", os.path.join(CFG, "probe_classify_tiny.yaml"), f"backbone.export_dir={out}",
                     "backbone.adapt_clips=false", f"output_dir={tmp_path}", "max_steps=1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "classify.img_size=32" in err and "56x56 px" in err
    assert not (tmp_path / "results.json").exists()
