"""Checkpoint atomicity, resume selection, loading without unpickling code, and reading real
DeepSpeed checkpoints (ZeRO-1, ZeRO-3, bf16) without importing DeepSpeed."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ivfast import checkpoint_io, files
from ivfast.training import checkpoint
from tests.support import ROOT, run_env


class _FakeEngine:
    """Stands in for a DeepSpeed engine: writes a file per save, can die halfway."""

    def __init__(self, die=False):
        self.die = die

    def save_checkpoint(self, ckpt_dir, tag, save_latest):
        assert save_latest is False  # ivfast writes `latest` itself, atomically
        os.makedirs(os.path.join(ckpt_dir, tag), exist_ok=True)
        torch.save({"w": torch.ones(2)}, os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt"))
        if self.die:
            raise KeyboardInterrupt("killed during the save")


def _save(ckpt, step, keep=2, die=False):
    checkpoint.save(_FakeEngine(die), ckpt, step, {"step": step}, keep, True, lambda: None)


def test_save_writes_state_then_latest_and_prunes(tmp_path):
    ckpt = str(tmp_path)
    for step in (10, 20, 30):
        _save(ckpt, step)
    assert checkpoint.complete_tags(ckpt) == ["step_00000020", "step_00000030"]
    assert open(os.path.join(ckpt, "latest")).read() == "step_00000030"
    assert checkpoint.read_state(ckpt, "step_00000030") == {"step": 30}


def test_a_save_killed_midway_leaves_latest_on_a_complete_checkpoint(tmp_path):
    ckpt = str(tmp_path)
    _save(ckpt, 10)
    with pytest.raises(KeyboardInterrupt):
        _save(ckpt, 20, die=True)
    assert os.path.isdir(os.path.join(ckpt, "step_00000020"))  # partial files exist...
    assert open(os.path.join(ckpt, "latest")).read() == "step_00000010"  # ...but latest never names them
    assert checkpoint.find_resume(ckpt) == "step_00000010"
    _save(ckpt, 30)  # the next good save cleans the partial directory up
    assert not os.path.exists(os.path.join(ckpt, "step_00000020"))


def test_resume_skips_a_latest_that_names_an_incomplete_checkpoint(tmp_path):
    ckpt = str(tmp_path)
    _save(ckpt, 10)
    os.makedirs(os.path.join(ckpt, "step_00000020"))
    with open(os.path.join(ckpt, "latest"), "w") as f:
        f.write("step_00000020")  # e.g. written by another tool
    assert checkpoint.find_resume(ckpt) == "step_00000010"
    assert checkpoint.find_resume(str(tmp_path / "none")) is None


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > evil.txt",))


@pytest.mark.parametrize("load", [checkpoint_io.safe_load, checkpoint.safe_load], ids=["reader", "engine"])
def test_safe_load_refuses_code_in_a_pickle(tmp_path, monkeypatch, load):
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "evil.pt")
    torch.save({"x": _Evil()}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        load(path)
    assert not os.path.exists("evil.txt")
    good = str(tmp_path / "good.pt")
    torch.save({"w": torch.arange(3), "meta": {"step": 1}}, good)
    assert torch.equal(load(good)["w"], torch.arange(3))


def test_state_file_is_json(tmp_path):
    _save(str(tmp_path), 5)
    with open(tmp_path / "step_00000005" / checkpoint.STATE_FILE) as f:
        assert json.load(f) == {"step": 5}


def test_reader_names_a_class_it_does_not_allow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tag = tmp_path / "step_00000001"
    tag.mkdir()
    torch.save({"module": {"w": torch.ones(1)}, "x": _Evil()}, str(tag / "mp_rank_00_model_states.pt"))
    (tag / checkpoint_io.STATE_FILE).write_text("{}")
    with pytest.raises(checkpoint_io.CheckpointError, match=r"cannot be read safely \(it holds posix.system"):
        checkpoint_io.load_model_state(str(tag))
    assert not os.path.exists("evil.txt")


def test_layout_is_shared_with_the_reader():
    for name in ("STATE_FILE", "LATEST", "TAG_RE", "tag_for", "complete_tags", "find_resume", "read_state"):
        assert getattr(checkpoint, name) is getattr(checkpoint_io, name)
    assert checkpoint.atomic_write_text is files.atomic_write_text  # one writer for the trainer and the readers
    assert checkpoint.tag_for(100) == "step_00000100"
    assert checkpoint_io.TAG_RE.match("step_00000100").group(1) == "00000100"
    assert not checkpoint_io.TAG_RE.match("step_100")
    # the engine's real classes are the ones the reader has stand-ins for
    real = [f"{c.__module__}.{c.__qualname__}" for c in checkpoint.deepspeed_classes()]
    assert sorted(real) == sorted(checkpoint_io.DEEPSPEED_CLASSES)


def test_atomic_write_text_replaces_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "latest")
    files.atomic_write_text(path, "step_00000001")
    files.atomic_write_text(path, "step_00000002")
    assert open(path).read() == "step_00000002"
    assert os.listdir(tmp_path) == ["latest"]


# ----------------------------------------------------------------------------- real DeepSpeed checkpoints

# Run in a subprocess per checkpoint (DeepSpeed's process group and ZeRO-3 hooks stay out of the
# test process): train a tiny model 2 steps, save with checkpoint.save, then load the checkpoint
# into a freshly initialised engine with checkpoint.load and take one more step.
_WRITE = r"""
import importlib, json, os, socket, sys

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                  DS_ACCELERATOR="cpu")
import torch
import deepspeed

importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
deepspeed.init_distributed(dist_backend="gloo")
from ivfast.training import checkpoint
from ivfast.training.engine import wrap

ckpt, stage, bf16, out = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "bf16", sys.argv[4]
dtype = torch.bfloat16 if bf16 else torch.float32


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7))
        self.head = torch.nn.Linear(7, 3)
        self.frozen = torch.nn.Linear(3, 2).requires_grad_(False)
        self.register_buffer("steps", torch.arange(4))

    def forward(self, x):
        return self.frozen(self.head(self.encoder(x))).square().mean()


def engine(seed):
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
           "zero_allow_untested_optimizer": True, "bf16": {"enabled": bf16}, "steps_per_print": 2**62,
           "checkpoint": {"tag_validation": "Warn"}}
    return wrap(model, opt, cfg), list(model.state_dict())


torch.manual_seed(123)
xs = [torch.randn(2, 5, dtype=dtype) for _ in range(3)]
eng, keys = engine(0)
for x in xs[:2]:
    eng.backward(eng(x))
    eng.step()
tag = checkpoint.save(eng, ckpt, 2, {"step": 2}, 2, True, lambda: None)
fixed = {k: v.float().tolist() for k, v in eng.module.state_dict().items() if k.startswith("frozen.") or k == "steps"}

eng2, _ = engine(1)
state = checkpoint.load(eng2, ckpt, tag)
loss, resumed = eng(xs[2]), eng2(xs[2])
eng2.backward(resumed)
eng2.step()
with open(out, "w") as f:
    json.dump({"tag": tag, "state": state, "keys": keys, "fixed": fixed, "loss": loss.item(),
               "resumed_loss": resumed.item(), "loss_scaler": type(eng2.optimizer.loss_scaler).__module__}, f)
"""

# A fresh interpreter: the checkpoint readers and every probe module, then load_model_state.
_READ = r"""
import json, sys
import ivfast.checkpoint_io, ivfast.export, ivfast.probes.cli
import ivfast.probes.classify, ivfast.probes.depth, ivfast.probes.track
from ivfast.checkpoint_io import load_model_state
from safetensors.torch import save_file

for src, dst in zip(sys.argv[1::2], sys.argv[2::2]):
    save_file({k: v.contiguous() for k, v in load_model_state(src).items()}, dst)
banned = ("deepspeed", "ivfast.training.trainer", "ivfast.training.engine", "ivfast.training.checkpoint",
          "ivfast.training.step")
print(json.dumps(sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in banned))))
"""

KINDS = {"zero1": ("1", "fp32"), "zero3": ("3", "fp32"), "zero1_bf16": ("1", "bf16")}


@pytest.fixture(scope="module")
def ds_checkpoints(tmp_path_factory):
    """{kind: (checkpoints dir, what the writer reported)} for real tiny DeepSpeed checkpoints."""
    base = tmp_path_factory.mktemp("ds")
    script = base / "write.py"
    script.write_text(_WRITE)
    procs = {}
    for kind, (stage, precision) in KINDS.items():
        cmd = [sys.executable, str(script), str(base / kind), stage, precision, str(base / f"{kind}.json")]
        procs[kind] = subprocess.Popen(cmd, cwd=ROOT, env=run_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    out = {}
    for kind, proc in procs.items():
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, (kind, log[-4000:])
        out[kind] = (str(base / kind), json.loads((base / f"{kind}.json").read_text()))
    return out


def test_engine_resumes_from_its_own_checkpoint(ds_checkpoints):
    for kind, (ckpt, info) in ds_checkpoints.items():
        assert info["tag"] == "step_00000002" and info["state"] == {"step": 2}, kind
        assert info["resumed_loss"] == info["loss"], kind  # the weights came back
        assert info["loss_scaler"].startswith("deepspeed."), kind  # the engine got the real class
        assert checkpoint.find_resume(ckpt) == "step_00000002"


def test_reader_loads_every_zero_stage_without_deepspeed(ds_checkpoints, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    args = []
    for kind, (ckpt, _) in ds_checkpoints.items():
        args += [ckpt, str(tmp_path / f"{kind}.safetensors")]
    proc = subprocess.run([sys.executable, "-c", _READ, *args], cwd=ROOT, env=run_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []  # no DeepSpeed, no trainer module imported
    files = os.listdir(os.path.join(ds_checkpoints["zero3"][0], "step_00000002"))
    assert any(f.startswith("zero_pp_rank_0") and f.endswith("_model_states.pt") for f in files)  # a ZeRO-3 layout
    for kind, (ckpt, info) in ds_checkpoints.items():
        got = load_file(str(tmp_path / f"{kind}.safetensors"))
        assert sorted(got) == sorted(info["keys"]), kind
        assert all(v.dtype == (torch.int64 if k == "steps" else torch.float32) for k, v in got.items()), kind
        # DeepSpeed's own consolidation (fp32 master weights) agrees on what it rebuilds...
        ref = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="step_00000002")
        assert set(ref) <= set(got) and len(ref) >= 6, kind
        for k, v in ref.items():
            assert torch.equal(got[k], v.float()), (kind, k)
        # ...and the frozen parameters and buffers are those of the module.
        for k, v in info["fixed"].items():
            assert torch.equal(got[k].float(), torch.tensor(v)), (kind, k)


def test_reader_stand_ins_and_engine_real_classes(ds_checkpoints):
    tag_dir = os.path.join(ds_checkpoints["zero1"][0], "step_00000002")
    optim = os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    found = torch.serialization.get_unsafe_globals_in_checkpoint(optim)
    assert set(found) <= set(checkpoint_io.DEEPSPEED_CLASSES) and found  # no other class to allow
    read = checkpoint_io.safe_load(optim)["optimizer_state_dict"]
    assert read["zero_stage"] == 1 and not type(read["zero_stage"]).__module__.startswith("deepspeed")
    real = checkpoint.safe_load(optim)["optimizer_state_dict"]
    assert type(real["zero_stage"]).__module__ == "deepspeed.runtime.zero.config"
    assert type(real["loss_scaler"]).__name__ == "LossScaler" and real["loss_scaler"].cur_scale == 1
    assert read["loss_scaler"].cur_scale == 1
