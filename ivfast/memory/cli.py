"""``ivfast-memory report``: the modelled (and, on a GPU, measured) memory of Stage-1 rows.

    ivfast-memory report                                   # the paper's three rows
    ivfast-memory report --config tiny                     # any config: a file or a packaged name (repeatable)
    ivfast-memory report --measure                         # + a few real steps per row on CUDA
"""
from __future__ import annotations

import argparse
import os
import sys

from ivfast.config import ConfigError
from ivfast.memory import report


def measure(cfg, steps: int = 3) -> tuple[float, dict]:
    """Peak GiB (allocated + CUDA context) of ``steps`` training steps of ``cfg`` on this GPU,
    through the trainer's step and DeepSpeed engine, and the per-phase peaks (MiB)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("--measure needs a CUDA GPU; none is visible here")
    from ivfast.memory.analytic import CUDA_CONTEXT_GIB
    from ivfast.rng import SampleRNG
    from ivfast.training.engine import build_engine, init_runtime
    from ivfast.training.phase_tracker import PhaseTracker, phase, watch_stage1
    from ivfast.training.step import Stage1Step

    rt = init_runtime(cfg)
    torch.manual_seed(0)
    step = Stage1Step(cfg)
    engine = build_engine(cfg, step, rt)
    tracker = step.tracker = PhaseTracker.for_device(rt.device)
    watch_stage1(tracker, step.model)
    d = cfg.data
    video = torch.randn(d.batch_size, 3, d.num_frames, d.img_size, d.img_size, device=rt.device)
    torch.cuda.reset_peak_memory_stats(rt.device)
    peak, phases = 0, {}
    for i in range(steps):
        tracker.set_active(i == steps - 1)
        rng = SampleRNG.for_step(0, i, range(d.batch_size), rt.device)
        with phase(tracker, "forward"):
            out = step.forward(engine, video, rng)
        with phase(tracker, "backward"):
            engine.backward(out["loss"])
        with phase(tracker, "optimizer step"):
            engine.step()
        peak = max(peak, torch.cuda.max_memory_allocated(rt.device))
        phases = tracker.record() or phases
    tracker.unwatch()
    del engine, step
    torch.cuda.empty_cache()
    return peak / 2**30 + CUDA_CONTEXT_GIB, phases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ivfast-memory", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="write memory_report.md and memory_report.png")
    r.add_argument("--config", action="append", default=None,
                   help="a config file or packaged name (repeatable); default: the paper's rows")
    r.add_argument("--batch", type=int, default=16)
    r.add_argument("--frames", type=int, default=16)
    r.add_argument("--mask", type=float, default=0.8)
    r.add_argument("--zero", type=int, default=1, choices=(0, 1, 2, 3))
    r.add_argument("--world", type=int, default=1)
    r.add_argument("--measure", action="store_true", help="also run a few steps per row on the GPU")
    r.add_argument("--out", default="runs/memory")
    r.add_argument("overrides", nargs="*", help="config overrides key=value, applied to every row")
    args = p.parse_args(argv)
    if args.world < 1:
        p.error("--world must be >= 1")
    if args.config:
        specs = [(os.path.splitext(os.path.basename(c))[0], c, None) for c in args.config]
        sizes = (None, None, None) if (args.batch, args.frames, args.mask) == (16, 16, 0.8) else \
            (args.batch, args.frames, args.mask)
    else:
        specs = list(report.PAPER_ROWS)
        sizes = (args.batch, args.frames, args.mask)
    try:
        if args.measure:
            import torch

            if not torch.cuda.is_available():
                print("ivfast-memory: --measure needs a CUDA GPU; none is visible here", file=sys.stderr)
                return 2
        rows = []
        for name, path, paper in specs:
            cfg = report.row_config(path, *sizes, overrides=args.overrides)
            row = report.build_row(name, path, cfg, paper, args.zero, args.world)
            if args.measure:
                row.measured_gib, row.measured_phases = measure(cfg)
            rows.append(row)
    except (ConfigError, RuntimeError) as e:
        print(f"ivfast-memory: {e}", file=sys.stderr)
        return 2
    md, png = report.write(rows, args.out, args.zero, args.world)
    for row in rows:
        paper = f"paper {row.paper_gib:g} GB, " if row.paper_gib else ""
        meas = f", measured {row.measured_gib:.1f}" if row.measured_gib is not None else ""
        print(f"{row.name}: {paper}release's way {row.release.gib():.1f}, ivfast {row.ivfast.gib():.1f}, "
              f"ivfast + checkpointing {row.ivfast_ckpt.gib():.1f} GiB{meas}")
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
