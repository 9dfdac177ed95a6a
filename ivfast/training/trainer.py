"""The training loop on a DeepSpeed engine, for either stage (the step: ``step.py``).

Per micro-batch: load -> the step's forward -> one all-reduce of [losses, bad-video counts,
stop request] -> backward + optimiser step, or a skip on every rank when any rank's loss is
NaN/Inf. Checkpoints at optimiser-step boundaries carry the data position, so a resumed run
sees the same batches in the same order.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time

import torch

from ivfast.config import Config, save_config
from ivfast.data.loader import build_dataset, build_loader
from ivfast.models.layers import count_parameters
from ivfast.ops.attention import describe_backend
from ivfast.rng import SampleRNG, mix64
from ivfast.training import checkpoint, distributed
from ivfast.training.engine import build_engine, init_runtime
from ivfast.training.flops import StepFlops, Throughput, count_step_flops, device_peak_tflops, tokens_per_clip
from ivfast.training.loggers import Loggers
from ivfast.training.metrics import Progress, peak_memory_mb, reset_peak_memory
from ivfast.training.optim import LRSchedule, effective_lr
from ivfast.training.phase_tracker import PhaseTracker, phase, watch_stage1
from ivfast.training.profiling import StepProfiler
from ivfast.training.step import build_step

log = logging.getLogger("ivfast.train")

MAX_CONSECUTIVE_SKIPS = 50


class StopRequested:
    """SIGTERM, SIGINT and SIGUSR1 set a flag; the loop saves at the next step boundary and exits.

    SIGUSR1 is Slurm's warning before the time limit (``sbatch --signal=USR1@120``): the run
    stops to be requeued, and ``ivfast/train.py`` then exits with ``REQUEUE_EXIT`` (75,
    EX_TEMPFAIL of sysexits.h: "try again later") so that the batch script can tell it from a
    finished run (exit 0) and requeue the job; the next start resumes from the checkpoint. A
    stop by SIGTERM/SIGINT exits 0 as before. A second SIGTERM/SIGINT gives up at once; a
    repeated SIGUSR1 changes nothing. ``received`` (class attribute) is the first signal of the
    latest run in this process, or None.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    REQUEUE_SIGNALS = (signal.SIGUSR1,)
    REQUEUE_EXIT = 75
    received: int | None = None

    def __init__(self, announce: bool = True):
        self.flag = False
        self.announce = announce  # log the signal (rank 0); the other ranks stay quiet
        StopRequested.received = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.flag:
            if signum in self.REQUEUE_SIGNALS:  # a repeated warning: still saving
                return
            raise KeyboardInterrupt  # a second SIGTERM/SIGINT: give up at once
        self.flag = True
        StopRequested.received = signum
        if self.announce:
            why = ("Slurm's warning before the time limit (sbatch --signal=USR1@...)"
                   if signum in self.REQUEUE_SIGNALS else "asked to stop")
            then = (f"exit {self.REQUEUE_EXIT} so that the job is requeued and resumes"
                    if signum in self.REQUEUE_SIGNALS else "exit; run the same command to resume")
            log.warning("%s received (%s): saving a checkpoint at the next step boundary, then %s", name, why, then)


def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def train(cfg: Config) -> dict:
    """Run (or resume) the training described by ``cfg``; returns a summary dict."""
    rt = init_runtime(cfg)
    dist = rt.dist
    device_kind = rt.device.type
    _setup_logging(dist.is_main)
    out_dir = cfg.output_dir
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    if dist.is_main:
        os.makedirs(out_dir, exist_ok=True)
        save_config(cfg, os.path.join(out_dir, "config.yaml"))
    distributed.barrier()

    step = build_step(cfg)
    model = step.model
    step.tracker = PhaseTracker.for_device(dist.device)  # peaks per phase on the logged steps (CUDA)
    if cfg.model.stage == 1:
        watch_stage1(step.tracker, model)
    dataset = build_dataset(cfg.data)
    loader, sampler = build_loader(cfg.data, dataset, rank=dist.rank, world=dist.world, seed=cfg.train.seed,
                                   pin_memory=device_kind == "cuda", dtype=rt.dtype)

    ga = cfg.train.grad_accum
    steps_per_epoch = len(sampler) // ga
    if steps_per_epoch == 0:
        raise ValueError(f"an epoch has {len(sampler)} batches, fewer than train.grad_accum = {ga}")
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    warmup = cfg.train.warmup_steps or round(cfg.train.warmup_epochs * steps_per_epoch)
    eff = effective_lr(cfg.train, cfg.data.batch_size, dist.world)
    schedule = LRSchedule(eff.lr, eff.min_lr, total_steps, warmup, eff.warmup_lr)
    engine = build_engine(cfg, step, rt)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_steps": 0, "bad_videos": 0, "samples": 0}
    resumed_from = checkpoint.find_resume(ckpt_dir) if cfg.train.resume == "auto" else None
    if resumed_from:
        state.update(checkpoint.load(engine, ckpt_dir, resumed_from))
    if dist.is_main:
        what = f"Stage 1 ({cfg.model.recon} recon)" if cfg.model.stage == 1 else "Stage 2"
        log.info("ivfast %s on %d x %s, %s, ZeRO-%d; %.2f M trainable params, %.2f M frozen (teacher)",
                 what, dist.world, device_kind, "bf16" if rt.bf16 else "fp32", cfg.deepspeed.zero_stage,
                 count_parameters(model, trainable=True) / 1e6, step.frozen_params() / 1e6)
        log.info("attention: %s", describe_backend(dist.device))
        log.info("%d samples, %d steps per epoch, %d steps in all (warmup %d); %s", len(dataset), steps_per_epoch,
                 total_steps, warmup, f"resuming from {resumed_from} at step {state['step']}" if resumed_from
                 else "starting from scratch")
        log.info("lr: base %g (lr_scaling %s), global batch %d (%d per rank x %d ranks x %d accumulation), "
                 "factor %g -> lr %g, min_lr %g, warmup_lr %g", cfg.train.lr, cfg.train.lr_scaling,
                 eff.global_batch, cfg.data.batch_size, dist.world, ga, eff.factor, eff.lr, eff.min_lr, eff.warmup_lr)

    stop = StopRequested(announce=dist.is_main)
    flops = _count_flops(cfg, model.cfg) if dist.is_main else None
    device_name, peak = device_peak_tflops(dist.device)
    if dist.is_main:
        log.info("MFU: %s", f"{device_name}, dense bf16 peak {peak:g} TFLOP/s" if peak
                 else f"not reported ({device_name} has no known dense bf16 peak)")
    throughput = Throughput(tokens_per_clip(cfg), flops.per_clip if flops else None, dist.world, peak)
    loggers = Loggers.for_run(cfg, dist.is_main)
    progress = Progress(total_steps, state["step"], dist.is_main and cfg.train.progress)
    profiler = StepProfiler(out_dir, cfg.train.profile, dist.device, dist.rank)
    consecutive_skips = 0
    accum = _StepAccumulator()  # the log interval's sums, from here to the next record
    last_saved = state["step"] if resumed_from else -1
    try:
        while state["step"] < total_steps:
            sampler.set_position(state["epoch"], state["batch_in_epoch"])
            batches = iter(loader)
            while state["step"] < total_steps:
                doing = state["step"] + 1  # the optimiser step this micro-batch belongs to
                profiler.begin(doing)
                with profiler.step_range(doing), profiler.guard(doing):
                    t0 = time.perf_counter()
                    batch = next(batches, None)
                    if batch is None:
                        break
                    accum.data_time += time.perf_counter() - t0
                    state["batch_in_epoch"] += 1
                    result = _micro_step(engine, step, batch, cfg, dist, state, stop, schedule)
                state["bad_videos"] += result["bad"]
                state["samples"] += result["clips"]
                if result["skipped"]:
                    state["skipped_steps"] += 1
                    consecutive_skips += 1
                    log.warning("step %d: %s on at least one rank; skipped on all ranks (%d skipped so far)",
                                state["step"], result["why"], state["skipped_steps"])
                    if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                        raise RuntimeError(f"{consecutive_skips} consecutive steps skipped ({result['why']}); stopping")
                    continue  # not a step: DeepSpeed saw neither backward nor step
                consecutive_skips = 0
                accum.add(result)
                if not result["boundary"]:
                    continue
                state["step"] += 1
                accum.steps += 1
                with accum.paused():  # writing the trace is not training time
                    profiler.end(state["step"])
                if state["step"] % cfg.train.log_every == 0:
                    if dist.is_main:
                        record = accum.record(state, accum.elapsed(), engine, dist.device, throughput)
                        loggers.log(record)
                        progress.update(accum.steps, record)
                    reset_peak_memory(dist.device)  # the next record's peak is its interval's
                    accum = _StepAccumulator()
                if state["step"] % cfg.train.save_every == 0 or state["step"] == total_steps or result["stop"]:
                    with accum.paused():  # nor is saving: the interval's rates leave it out
                        checkpoint.save(engine, ckpt_dir, state["step"], state, cfg.train.keep_checkpoints,
                                        dist.is_main, distributed.barrier)
                    last_saved = state["step"]
                if result["stop"]:
                    log.warning("stop requested: checkpoint saved at step %d; run the same command to resume",
                                state["step"])
                    return {"status": "stopped", **state}
            if state["step"] >= total_steps:
                break
            state["epoch"] += 1  # the epoch's batches are exhausted
            state["batch_in_epoch"] = 0
    finally:
        profiler.close()
        progress.close()
        loggers.close()
    if last_saved != state["step"]:
        checkpoint.save(engine, ckpt_dir, state["step"], state, cfg.train.keep_checkpoints, dist.is_main,
                        distributed.barrier)
    if dist.is_main:
        log.info("done: %d steps, %d skipped, %d unreadable videos; outputs in %s", state["step"],
                 state["skipped_steps"], state["bad_videos"], out_dir)
    return {"status": "done", **state}


def _count_flops(cfg: Config, model_cfg) -> StepFlops | None:
    """The step's FLOPs (:func:`ivfast.training.flops.count_step_flops`), logged; None (and a
    warning: TFLOP/s and MFU go unreported) when they cannot be counted."""
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            flops = count_step_flops(cfg, model_cfg)
    except Exception as e:  # noqa: BLE001 - the run goes on without FLOPs
        log.warning("FLOPs not counted (%s: %s): TFLOP/s and MFU are not reported", type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
        return None
    log.info("FLOPs: %s; counted in %.1f s", flops.describe(), time.perf_counter() - t0)
    return flops


class _StepAccumulator:
    """Sums over the micro-batches and optimiser steps of one log interval, for its record.

    Rates are over the interval's wall time (``elapsed``: since this accumulator was made, less
    the ``paused`` spans: checkpoint saves, trace writing); losses are means over its micro-batches,
    ``grad_norm`` the mean over its steps (``grad_norm_max`` their largest).
    """

    def __init__(self):
        self.t0 = time.perf_counter()
        self.excluded = 0.0
        self.data_time = 0.0
        self.sums: dict[str, float] = {}
        self.micro = 0
        self.steps = 0
        self.clips = 0
        self.grad_norms: list[float] = []
        self.phase_peaks: dict[str, float] = {}

    def add(self, result: dict) -> None:
        self.micro += 1
        self.clips += result["clips"]
        for k, v in result["losses"].items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        if result.get("grad_norm") is not None:
            self.grad_norms.append(result["grad_norm"])
        for k, v in result.get("mem", {}).items():
            self.phase_peaks[k] = max(self.phase_peaks.get(k, 0.0), v)

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0 - self.excluded

    def record(self, state: dict, elapsed: float, engine, device, throughput: Throughput | None = None) -> dict:
        """The interval's record; ``elapsed``: its wall time in seconds (clips are global: every rank's)."""
        steps = max(1, self.steps)
        losses = {k: v / max(1, self.micro) for k, v in self.sums.items()}
        norms = self.grad_norms
        clips_per_s = self.clips / elapsed if elapsed > 0 else None
        rec = {"step": state["step"], "epoch": state["epoch"], **losses,
               "lr": engine.optimizer.param_groups[0]["lr"],
               "grad_norm": sum(norms) / len(norms) if norms else None, "grad_norm_max": max(norms, default=None),
               "step_time": elapsed / steps, "data_time": self.data_time / steps,
               "data_share": self.data_time / elapsed if elapsed > 0 else None,
               "clips_per_s": clips_per_s}
        if throughput is not None:
            rec.update(throughput.fields(clips_per_s))
        rec.update({"skipped_steps": state["skipped_steps"], "bad_videos": state["bad_videos"]})
        mem = peak_memory_mb(device)
        if self.phase_peaks:  # the phase tracker restarts the allocator's peak inside the step
            mem["peak_mem_mb"] = max(mem["peak_mem_mb"], *self.phase_peaks.values())
        rec.update(mem)
        rec.update(self.phase_peaks)
        return rec


def _micro_step(engine, step, batch, cfg: Config, dist, state: dict, stop: StopRequested,
                schedule: LRSchedule) -> dict:
    """Forward, cross-rank agreement, then backward/step or a skip. Returns what the loop logs."""
    video = batch["video"]
    n_good = 0 if video is None else video.shape[0]
    n_bad = batch["num_bad"]
    boundary = engine.is_gradient_accumulation_boundary()
    # Randomness follows the data position: drop-path draws (global RNG, per rank) and the
    # per-sample streams (masks, diffusion noise) are seeded from (epoch, batch in epoch).
    position = state["epoch"] * 10**9 + state["batch_in_epoch"]
    torch.manual_seed(mix64(cfg.train.seed, position, dist.rank))
    keys = step.loss_names
    out = None
    tracker = step.tracker
    if tracker is not None:  # on the steps that get logged
        tracker.set_active(dist.is_main and (state["step"] + 1) % cfg.train.log_every == 0)
    if n_good:
        video = video.to(dist.device, non_blocking=True)
        rng = SampleRNG.for_step(cfg.train.seed, position, batch["index"].tolist(), dist.device)
        with phase(tracker, "forward"):
            out = step.forward(engine, video, rng)
    # One all-reduce: loss components (summed), counts, stop request.
    n_keys = len(keys)
    vec = torch.zeros(n_keys + 4, dtype=torch.float64, device=dist.device)
    if out is not None:
        vec[:n_keys] = torch.stack([out[k].detach().double() for k in keys])
    vec[n_keys:] = torch.tensor([float(n_good > 0), n_good, n_bad, float(stop.flag)], dtype=torch.float64)
    distributed.all_reduce_sum(vec)
    ranks_with_data, good, bad, stop_votes = vec[n_keys:].tolist()
    result = {"boundary": boundary, "bad": n_bad, "clips": int(good),
              "stop": stop_votes > 0, "skipped": False, "losses": {}}
    if good + bad > 0 and bad / (good + bad) > cfg.data.max_bad_fraction:
        raise RuntimeError(f"{int(bad)} of {int(good + bad)} videos in this batch could not be read "
                           f"(more than data.max_bad_fraction = {cfg.data.max_bad_fraction}); "
                           f"check the data list (the warnings above name the files)")
    if ranks_with_data < dist.world:
        return {**result, "skipped": True, "why": "a batch with no readable video"}
    if not math.isfinite(vec[0].item()):
        return {**result, "skipped": True, "why": "a non-finite loss"}
    result["losses"] = {k: vec[i].item() / dist.world for i, k in enumerate(keys)}
    if boundary:
        for group in engine.optimizer.param_groups:
            group["lr"] = schedule.lr(state["step"])
    with phase(tracker, "backward"):
        engine.backward(out["loss"])
    grad_norm = _manual_grad_norm(engine) if boundary and engine.zero_optimization_stage() == 0 else None
    with phase(tracker, "optimizer step"):
        engine.step()
    if tracker is not None:
        result["mem"] = tracker.record()
    if boundary:
        step.after_step(engine)
        gn = engine.get_global_grad_norm() if grad_norm is None else grad_norm
        result["grad_norm"] = float(gn) if gn is not None else None
    return result


def _manual_grad_norm(engine) -> float:
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item() \
        if grads else 0.0

