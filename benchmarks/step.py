"""Time a full Stage-1 training step three ways: the release's way, ivfast, ivfast compiled.

    python benchmarks/step.py                       # the three variants x (B, L), batch 16, 16 frames, mask 0.8
    python benchmarks/step.py --configs configs/stage1_b_diffusion.yaml --ways release ivfast
    python benchmarks/step.py --configs configs/tiny.yaml --steps 1 --warmup 1   # the CPU smoke run
    python benchmarks/step.py --dry-run [args]      # resolve every row's config and the imports a run needs; run nothing

Each (config, way) row builds the real Stage-1 task (random weights) on a DeepSpeed engine
(ZeRO-1, bf16 on a GPU; fp32 on the CPU) exactly as ``ivfast/train.py`` does, and runs:
- ``--warmup`` steps, then ``--steps`` steps timed end to end (no synchronisation inside a
  step): clips/s and tokens/s come from these;
- ``--steps`` more steps with a device synchronisation at every phase boundary: the split of
  step time into data (one batch from the configured loader), teacher (teacher forward +
  mask), student forward, backward and optimiser step.

Ways (overrides applied on top of the config file):
- ``release``: the release's way as a mode of our model: ``ivfast.config.RELEASE_WAY`` (no
  ivfast kernel runs, no lean saves or chunked loss, eager teacher attention, fp32 teacher and
  diffusion head; the same list the memory model's release's way starts from).
- ``ivfast``: the config as written (fused Triton kernels, FlashAttention / SDPA).
- ``compile``: ``ivfast`` with ``torch.compile`` applied to the encoder and predictor
  modules (where it helps; a failure to compile is recorded in the row, not raised).

FLOPs per step come from the library, as the trainer's log records do
(:func:`ivfast.training.flops.count_step_flops`: one micro-batch on fake tensors, teacher forward +
student forward and backward, model FLOPs with the windowed predictor layers counted at their band),
once per resolved config. Achieved TFLOP/s = FLOPs / step time; MFU = achieved / the device's
dense bf16 peak (:func:`ivfast.training.flops.peak_tflops`; None for a device it does not know).

On a GPU the rows go to ``benchmarks/results/step-gpu-<date>.{json,md}``; on the CPU only
with ``--write`` (then ``*-cpu-*``, which git ignores).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import on_gpu, write_results  # noqa: E402
from ivfast.config import RELEASE_WAY, load_config, to_dict  # noqa: E402
from ivfast.training.flops import Throughput, count_step_flops, device_peak_tflops, tokens_per_clip  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = [f"configs/stage1_{size}_{variant}.yaml" for size in ("b", "l")
                   for variant in ("align", "linear", "diffusion")]
PAPER_SHAPE = ["data.batch_size=16", "data.num_frames=16", "model.mask_ratio=0.8"]

WAYS = {"release": RELEASE_WAY, "ivfast": [], "compile": []}


def load_row_config(cfg_path: str, overrides: list[str]):
    """A row's config: ``cfg_path`` relative to the repository (or absolute), with ``overrides``."""
    return load_config(os.path.join(ROOT, cfg_path), overrides)


class _Sync:
    """Wall-clock phase timer; synchronises the device at each boundary when ``enabled``."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.device = enabled, device
        self.times: dict[str, float] = {}
        self.t = time.perf_counter()

    def mark(self, phase: str) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[phase] = self.times.get(phase, 0.0) + (now - self.t)
        self.t = now


def _apply_compile(model) -> str:
    try:
        model.encoder.compile()
        if getattr(model, "predictor", None) is not None:
            model.predictor.compile()
        return "encoder+predictor"
    except Exception as e:  # noqa: BLE001 - recorded in the row
        return f"not compiled: {type(e).__name__}: {e}"


class StepRunner:
    """One (config, way): the trainer's step on its DeepSpeed engine, the configured loader, and a
    timed optimiser step."""

    def __init__(self, cfg, way: str):
        from ivfast.data.loader import build_dataset, build_loader
        from ivfast.training.engine import build_engine, init_runtime
        from ivfast.training.step import build_step

        self.cfg, self.way = cfg, way
        self.rt = init_runtime(cfg)
        self.step_ = build_step(cfg)
        self.compiled = _apply_compile(self.step_.model) if way == "compile" else None
        self.engine = build_engine(cfg, self.step_, self.rt)
        dataset = build_dataset(cfg.data)
        self.loader, self.sampler = build_loader(cfg.data, dataset, rank=self.rt.dist.rank, world=self.rt.dist.world,
                                                 seed=cfg.train.seed, pin_memory=self.rt.device.type == "cuda",
                                                 dtype=self.rt.dtype)
        self.batches = iter(self.loader)
        self.position = 0

    @property
    def device(self) -> torch.device:
        return self.rt.device

    def _next_batch(self):
        batch = next(self.batches, None)
        if batch is None:
            self.sampler.set_position(self.sampler.epoch + 1)
            self.batches = iter(self.loader)
            batch = next(self.batches)
        return batch

    def step(self, timer: _Sync) -> int:
        """One optimiser step; returns the number of clips."""
        from ivfast.rng import SampleRNG

        batch = self._next_batch()
        video = batch["video"].to(self.device, non_blocking=True)
        timer.mark("data")
        self.position += 1
        rng = SampleRNG.for_step(self.cfg.train.seed, self.position, batch["index"].tolist(), self.device)
        inputs = self.step_.prepare(video, rng)
        timer.mark("teacher")
        out = self.engine(*inputs)
        timer.mark("student_forward")
        self.engine.backward(out["loss"])
        timer.mark("backward")
        self.engine.step()
        timer.mark("optimizer")
        return video.shape[0]

    def close(self) -> None:
        self.engine.destroy() if hasattr(self.engine, "destroy") else None
        self.batches = None


def run_row(cfg_path: str, way: str, overrides: list[str], steps: int, warmup: int, flop_cache: dict) -> dict:
    """Time ``way`` on ``cfg_path``; ``flop_cache`` (resolved config -> FLOPs per step) is filled
    by the first row of a config (the ``compile`` way's config is ``ivfast``'s)."""
    cfg = load_row_config(cfg_path, overrides + WAYS[way])
    row: dict = {"config": cfg_path, "way": way}
    runner = StepRunner(cfg, way)
    device = runner.device
    if runner.compiled is not None:
        row["compiled"] = runner.compiled
    off = _Sync(False, device)
    key = json.dumps(to_dict(cfg), sort_keys=True)
    if key not in flop_cache:
        try:
            flop_cache[key] = count_step_flops(cfg).per_step
        except Exception as e:  # noqa: BLE001 - FLOPs are reported as unknown, the timing still runs
            print(f"{cfg_path}: FLOP count failed ({type(e).__name__}: {e})")
            flop_cache[key] = None
    flops = flop_cache[key]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        runner.step(off)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, clips = time.perf_counter(), 0
    for _ in range(steps):
        clips += runner.step(off)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    step_s = (time.perf_counter() - t0) / steps
    split = _Sync(True, device)
    for _ in range(steps):
        runner.step(split)
    total_split = sum(split.times.values())
    clips_per_s = clips / steps / step_s
    rate = Throughput(tokens_per_clip(cfg), flops / cfg.data.batch_size if flops else None, 1,
                      device_peak_tflops(device)[1]).fields(clips_per_s)  # as the trainer reports them
    row.update({
        "step_ms": round(step_s * 1e3, 2),
        "clips_per_s": round(clips_per_s, 2),
        "tokens_per_s": round(rate["tokens_per_s"], 1),
        "tflops_per_step": round(flops / 1e12, 3) if flops else None,
        "achieved_tflops": round(rate["tflops"], 2) if rate["tflops"] is not None else None,
        "mfu_pct": round(100 * rate["mfu"], 2) if rate["mfu"] is not None else None,
    })
    row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    for phase in ("data", "teacher", "student_forward", "backward", "optimizer"):
        row[f"{phase}_pct"] = round(100 * split.times.get(phase, 0.0) / total_split, 1) if total_split else None
    runner.close()
    del runner
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _dry_run(args, overrides: list[str]) -> int:
    """Every row's config resolves (files, overrides, the way's overrides) and the modules that
    ``StepRunner`` imports lazily import here; prints one line per row."""
    import importlib

    from ivfast.config import ConfigError

    for module in ("ivfast.training.engine", "ivfast.training.step", "ivfast.data.loader", "ivfast.rng",
                   "ivfast.ops.attention", "ivfast.training.flops", "deepspeed"):
        importlib.import_module(module)
    bad = 0
    for cfg_path in args.configs:
        for way in args.ways:
            try:
                cfg = load_row_config(cfg_path, overrides + WAYS[way])
            except ConfigError as e:
                print(f"dry run: {cfg_path} {way}: {e}")
                bad += 1
                continue
            d = cfg.data
            print(f"dry run: {cfg_path} {way}: batch {d.batch_size}, {d.num_frames} frames, {d.img_size} px, "
                  f"mask {cfg.model.mask_ratio}, {args.warmup} warm-up + {args.steps} timed + {args.steps} split steps")
    print(f"dry run: {len(args.configs) * len(args.ways) - bad} of {len(args.configs) * len(args.ways)} rows resolve")
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    p.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--paper-shape", action=argparse.BooleanOptionalAction, default=None,
                   help="batch 16, 16 frames, mask 0.8 (default: on a GPU)")
    p.add_argument("--write", action="store_true", help="write results on the CPU too")
    p.add_argument("--dry-run", action="store_true",
                   help="load every (config, way) row's config as a GPU run would (paper shape unless "
                        "--no-paper-shape) and import what a run needs, then exit without running")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every row")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    paper = (on_gpu() or args.dry_run) if args.paper_shape is None else args.paper_shape
    overrides = (PAPER_SHAPE if paper else []) + ["data.source=synthetic", "train.progress=false"] + args.overrides
    if args.dry_run:
        return _dry_run(args, overrides)
    rows, flop_cache = [], {}
    for cfg_path in args.configs:
        for way in args.ways:
            try:
                row = run_row(cfg_path, way, overrides, args.steps, args.warmup, flop_cache)
            except torch.cuda.OutOfMemoryError as e:
                row = {"config": cfg_path, "way": way, "error": f"out of memory: {str(e)[:120]}"}
                torch.cuda.empty_cache()
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if on_gpu() or args.write:
        print(write_results("step", {"configs": args.configs, "ways": args.ways, "overrides": overrides,
                                     "way_overrides": WAYS, "steps": args.steps, "warmup": args.warmup,
                                     "resolved": {c: to_dict(load_row_config(c, overrides))
                                                  for c in args.configs}}, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
