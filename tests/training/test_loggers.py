"""The log records and where they go: metrics.jsonl, TensorBoard, W&B (offline)."""
import glob
import importlib.util
import json
import os
import struct
import sys
from types import SimpleNamespace

import pytest
import torch

from ivfast.config import ConfigError, load_config
from ivfast.training.flops import Throughput
from ivfast.training.loggers import LoggerUnavailable, TensorBoardLogger, WandbLogger, scalar_tag, scalars
from tests.support import ROOT
from tests.training.watched_run import LOG_EVERY, STEPS, watched_run

TINY = os.path.join(ROOT, "configs", "tiny.yaml")
FIELDS = {"step", "epoch", "loss", "loss_align_layers", "loss_align_final", "loss_recon", "diff_mse", "diff_vb", "lr",
          "grad_norm", "grad_norm_max", "step_time", "data_time", "data_share", "clips_per_s", "tokens_per_s",
          "tflops", "mfu", "skipped_steps", "bad_videos", "peak_mem_mb"}


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tags_group_the_fields():
    assert [scalar_tag(k) for k in ("loss", "diff_vb", "lr", "grad_norm", "clips_per_s", "mfu", "data_share",
                                    "peak_mem_mb", "mem_encoder_mb", "bad_videos", "step")] == [
        "loss/loss", "loss/diff_vb", "optim/lr", "optim/grad_norm", "throughput/clips_per_s", "throughput/mfu",
        "time/data_share", "memory/peak_mem_mb", "memory/mem_encoder_mb", "progress/bad_videos", None]
    assert scalars({"step": 3, "loss": 1.5, "mfu": None, "x": float("nan"), "ok": True}) == {"loss/loss": 1.5}


def test_a_record_averages_over_its_interval():
    from ivfast.training.trainer import _StepAccumulator

    engine = SimpleNamespace(optimizer=SimpleNamespace(param_groups=[{"lr": 0.1}]))
    state = {"step": 4, "epoch": 0, "skipped_steps": 0, "bad_videos": 0}
    acc = _StepAccumulator()
    acc.data_time = 1.0
    for loss, norm in ((2.0, 1.0), (4.0, 3.0)):  # two steps of one micro-batch each, 8 clips each
        acc.add({"clips": 8, "losses": {"loss": loss}, "grad_norm": norm, "mem": {"mem_encoder_mb": loss}})
        acc.steps += 1
    rec = acc.record(state, 4.0, engine, torch.device("cpu"), Throughput(64, 1e9, world=2, peak_tflops=None))
    assert rec["loss"] == 3.0 and rec["grad_norm"] == 2.0 and rec["grad_norm_max"] == 3.0
    assert rec["step_time"] == 2.0 and rec["data_time"] == 0.5 and rec["data_share"] == 0.25
    assert rec["clips_per_s"] == 4.0 and rec["tokens_per_s"] == 256.0
    assert rec["tflops"] == pytest.approx(4.0 * 1e9 / 2 / 1e12) and rec["mfu"] is None
    assert rec["mem_encoder_mb"] == 4.0 and rec["peak_mem_mb"] >= 4.0
    again = acc.record({**state, "bad_videos": 2}, 0.0, engine, torch.device("cpu"))  # no time: no share
    assert again["data_share"] is None and again["bad_videos"] == 2


def test_every_record_of_a_run_has_every_field():
    recs = _records(watched_run())
    assert [r["step"] for r in recs] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    for r in recs:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["mfu"] is None  # the CPU has no peak
        assert r["tflops"] > 0 and r["clips_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(64 * r["clips_per_s"])
        assert r["step_time"] * LOG_EVERY >= r["data_time"] * LOG_EVERY and 0 < r["data_share"] < 1


def test_tensorboard_event_file_has_every_scalar_of_the_records():
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = watched_run()
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    acc.Reload()
    tags = sorted(acc.Tags()["scalars"])
    print("TensorBoard scalars:", " ".join(tags))
    recs = _records(run_dir)
    assert tags == sorted(scalars(recs[0]))
    loss = acc.Scalars("loss/loss")
    assert [e.step for e in loss] == [r["step"] for r in recs]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in recs], rel=1e-6)
    assert {"throughput/tflops", "throughput/tokens_per_s", "time/data_share", "memory/peak_mem_mb"} <= set(tags)


def wandb_records(path: str) -> list:
    """The records of a W&B ``.wandb`` file (LevelDB log framing: 7-byte header, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", data[:8]
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # block padding
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # full / first, then middle / last
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def test_wandb_offline_run_has_the_config_and_the_records():
    pytest.importorskip("wandb")
    run_dir = watched_run()
    (path,) = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    with open(os.path.join(run_dir, "wandb_run_id")) as f:
        assert os.path.basename(path) == f"run-{f.read().strip()}.wandb"
    records = wandb_records(path)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "ivfast" and run.display_name == "watched"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["output_dir"] == run_dir and config["train"]["max_steps"] == STEPS
    assert config["model"]["encoder"]["width"] == 64  # the resolved config, nested
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    recs = _records(run_dir)
    assert [h["_step"] for h in history] == [r["step"] for r in recs]
    assert [h["loss/loss"] for h in history] == pytest.approx([r["loss"] for r in recs], rel=1e-6)
    assert "throughput/clips_per_s" in history[0] and "throughput/mfu" not in history[0]  # None is not logged


def test_a_missing_package_is_a_one_line_config_error_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["train.loggers=[jsonl,wandb]"])
    assert str(e.value) == ("config error: train.loggers = ['jsonl', 'wandb']: 'wandb' needs the wandb package: "
                            "pip install -e '.[wandb]'")
    load_config(TINY, ["train.loggers=[jsonl]"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # installed but broken at run time: the same advice
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = load_config(TINY)
    for logger in (WandbLogger, TensorBoardLogger):
        with pytest.raises(LoggerUnavailable, match=r"pip install -e '\.\["):
            logger(cfg)
