"""Profile one Stage-1 training step and list where the time goes, by operator.

    python benchmarks/profile_step.py --config configs/stage1_b_diffusion.yaml [key=value ...]

On a GPU: CUDA time and memory per operator (torch.profiler), written to
``benchmarks/results/profile_step-gpu-<date>.{json,md}``. On the CPU (small configs only)
it prints the table, so the script stays tested, and writes nothing unless ``--write``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import on_gpu, write_results  # noqa: E402
from ivfast.config import load_config, to_dict  # noqa: E402
from ivfast.rng import SampleRNG  # noqa: E402
from ivfast.training.engine import build_engine, init_runtime  # noqa: E402
from ivfast.training.step import build_step  # noqa: E402


def profile(cfg, steps: int = 3, top: int = 25):
    """Operator table of ``steps`` trainer steps (the trainer's step on its DeepSpeed engine)."""
    rt = init_runtime(cfg)
    device = rt.device
    torch.manual_seed(0)
    train_step = build_step(cfg)
    engine = build_engine(cfg, train_step, rt)
    b, d = cfg.data.batch_size, cfg.data
    video = torch.randn(b, 3, d.num_frames, d.img_size, d.img_size, device=device)

    def step(i):
        rng = SampleRNG.for_step(0, i, range(b), device)
        out = train_step.forward(engine, video, rng)
        engine.backward(out["loss"])
        engine.step()

    step(0)  # warm-up
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu() else [])
    with torch.profiler.profile(activities=acts, profile_memory=True) as prof:
        for i in range(steps):
            step(i + 1)
    key = "self_device_time_total" if on_gpu() else "self_cpu_time_total"
    rows = []
    for ev in sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]:
        rows.append({"op": ev.key, "calls": ev.count, "self_ms_per_step": getattr(ev, key) / 1e3 / steps,
                     "self_mem_mb_per_step": (ev.self_device_memory_usage if on_gpu() else ev.self_cpu_memory_usage)
                     / 2**20 / steps})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--write", action="store_true", help="write results on the CPU too")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    rows = profile(cfg, args.steps)
    for r in rows:
        print(f"{r['self_ms_per_step']:10.3f} ms {r['self_mem_mb_per_step']:10.1f} MB {r['calls']:6d}  {r['op']}")
    if on_gpu() or args.write:
        print(write_results("profile_step", {"config_file": args.config, "config": to_dict(cfg)}, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
