"""Helpers shared by the test folders: subprocess environments and the kernel tolerance rule."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Set by an in-process ``distributed.init`` earlier in the session (its store still holds
# MASTER_PORT): a training subprocess must pick its own rendezvous. (srun's SLURM_* variables and
# Slurm's ENVIRONMENT=BATCH, which ``distributed.launch_env`` reads, are dropped by conftest.py
# for the whole session, and by run_env.)
RENDEZVOUS_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "CROSS_RANK", "CROSS_SIZE"}


def run_env(interpret: bool = False, **extra) -> dict:
    """Environment for a training subprocess: the interpreter only when asked for, and no
    rendezvous variables (nor any SLURM_* variable, nor Slurm's ENVIRONMENT) inherited from this process."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS and not k.startswith("SLURM_")
           and k not in ("ENVIRONMENT", "TRITON_INTERPRET")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.update(extra)
    return env


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor, ref_pt: torch.Tensor, atol: float = 0.0,
                        factor: float = 2.0, what: str = "") -> None:
    """The kernel tolerance rule: ``out``'s largest error against the exact reference ``ref``
    (float64, or the op's defining float32 computation) is at most ``factor`` times the largest
    error of ``ref_pt`` (PyTorch's own computation in the kernel's dtype: the reference run on
    the same low-precision inputs) plus ``atol``. ``out`` and ``ref_pt`` have one dtype and
    ``ref``'s shape; a NaN in ``out`` where ``ref`` is finite fails.

    Kernels run through Triton's interpreter must round float32 -> bfloat16 to nearest like a
    GPU for this to hold (the interpreter truncates; tests/ops/conftest.py makes it round).
    """
    what = what or "output"
    assert out.shape == ref.shape == ref_pt.shape, (
        f"{what}: shape {tuple(out.shape)} vs reference {tuple(ref.shape)} / PyTorch {tuple(ref_pt.shape)}")
    assert out.dtype == ref_pt.dtype, f"{what}: dtype {out.dtype} vs PyTorch's {ref_pt.dtype}"
    if not out.numel():
        return
    ref = ref.detach().double().cpu()
    finite = torch.isfinite(ref)
    err = (out.detach().double().cpu() - ref)[finite].abs().max().item() if finite.any() else 0.0
    err_pt = (ref_pt.detach().double().cpu() - ref)[finite].abs().max().item() if finite.any() else 0.0
    assert err <= factor * err_pt + atol, (
        f"{what}: max error {err:.3g} > {factor} x PyTorch's own {err_pt:.3g} + atol {atol:.3g}")


def stage1_model(cfg):
    """The Stage-1 model of a run config (no teacher, no checkpointing applied)."""
    from ivfast.config import stage1_config
    from ivfast.models.stage1 import Stage1Model

    return Stage1Model(stage1_config(cfg))


def stage2_model(cfg):
    """The Stage-2 model of a run config (not initialised from Stage 1)."""
    from ivfast.config import stage2_config
    from ivfast.models.stage2 import Stage2Model

    return Stage2Model(stage2_config(cfg))


def write_text(tmp_path, name: str, text: str) -> str:
    """``text`` written to ``tmp_path / name``; the path as a string."""
    p = tmp_path / name
    p.write_text(text)
    return str(p)


TINY = os.path.join(ROOT, "configs", "tiny.yaml")
FAST = ["data.num_workers=0", "train.progress=false"]  # no loader workers, no progress bar


def train_args(out, overrides=(), config: str = TINY) -> list[str]:
    """``ivfast/train.py``'s arguments for a run of ``config`` into ``out``."""
    return ["ivfast/train.py", "--config", config, f"output_dir={out}", *FAST, *overrides]


def train_cmd(out, overrides=(), nproc: int = 1, config: str = TINY) -> list[str]:
    """The command of such a run: one process, or ``nproc`` ranks through the deepspeed launcher."""
    args = train_args(out, overrides, config)
    if nproc == 1:
        return [sys.executable, *args]
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [launcher, "--num_gpus", str(nproc), "--master_port", str(free_port()), *args]


def run_train(out, overrides=(), nproc: int = 1, timeout: int = 600, interpret: bool = False, config: str = TINY,
              **env):
    """Run it to the end from the repository root (``env`` added); a failure shows its output."""
    proc = subprocess.run(train_cmd(out, overrides, nproc, config), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=run_env(interpret, **env))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def export_model(base, cfg, model, name: str) -> tuple[str, str]:
    """``ivfast-export`` of ``model``'s state saved as a run (``base/<name>_run``: config.yaml +
    model.safetensors) into ``base/<name>``: (run dir, export dir)."""
    from ivfast.files import save_safetensors
    from ivfast.config import save_config
    from ivfast.export import main as export_main

    run = base / f"{name}_run"
    run.mkdir()
    save_config(cfg, str(run / "config.yaml"))
    save_safetensors(model.state_dict(), str(run / "model.safetensors"))
    out = str(base / name)
    assert export_main([str(run / "model.safetensors"), out]) == 0
    return str(run), out


def free_port() -> int:
    """A TCP port free on the loopback interface now (for a test's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_metrics(out: str) -> list[dict]:
    """A run's ``metrics.jsonl``: the last record of each step, in step order (a resumed run logs
    the replayed steps again)."""
    by_step = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


# What reading a tensor back on the host goes through (a GPU sync when the tensor is on a GPU).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Inside the block, any :data:`HOST_READS` of a tensor fails the test."""
    def refuse(*a, **k):
        raise AssertionError("a tensor was read back on the host")

    with monkeypatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, refuse)
        yield
