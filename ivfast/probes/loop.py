"""The head-training loop shared by the probes, its resumable checkpoint, and the batch order
(:func:`epoch_order`, :class:`KeyBatches`, :func:`make_loader`)."""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler

from ivfast.files import atomic_write_text, save_safetensors
from ivfast.probes.config import ProbeConfig
from ivfast.rng import mix64
from ivfast.training.metrics import MetricsWriter, Progress


def cosine_lr(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    """lr at ``step`` (0-based): linear warm-up over ``warmup`` steps, then cosine to ``min_lr`` at ``total``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    p = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * p))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters: no weight decay on biases and 1-d parameters."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _ckpt_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def save_checkpoint(out_dir: str, head: nn.Module, opt: torch.optim.Optimizer, step: int, extra: dict) -> None:
    """Write ``OUT/checkpoints``: ``head_<step>.safetensors`` and ``optim_<step>.safetensors``
    (each atomic), then ``state.json`` (naming the step; replaced atomically), then delete the
    other steps' files. A crash at any point leaves ``state.json`` naming complete files."""
    d = _ckpt_dir(out_dir)
    os.makedirs(d, exist_ok=True)
    save_safetensors(head.state_dict(), os.path.join(d, f"head_{step:08d}.safetensors"))
    osd = opt.state_dict()
    tensors, meta = {}, {}
    for pid, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim > 0:
                tensors[f"{pid}.{k}"] = v
            else:
                meta[f"{pid}.{k}"] = float(v)
    save_safetensors(tensors, os.path.join(d, f"optim_{step:08d}.safetensors"))
    state = {"step": step, "optim_scalars": meta, "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                                                    for g in osd["param_groups"]], **extra}
    atomic_write_text(os.path.join(d, "state.json"), json.dumps(state, indent=1))
    for name in os.listdir(d):
        if name.endswith(".safetensors") and not name.endswith(f"_{step:08d}.safetensors"):
            os.remove(os.path.join(d, name))


def load_checkpoint(out_dir: str, head: nn.Module, opt: torch.optim.Optimizer, meta: dict | None = None) -> dict | None:
    """Restore head and optimiser from ``OUT/checkpoints``; the saved state dict, or None when
    there is none. A value of ``meta`` that the checkpoint stores differently is a ValueError
    naming both, raised before anything is loaded."""
    from safetensors.torch import load_file

    d = _ckpt_dir(out_dir)
    sp = os.path.join(d, "state.json")
    if not os.path.isfile(sp):
        return None
    with open(sp) as f:
        state = json.load(f)
    for key, want in (meta or {}).items():
        have = state.get(key)
        if have is not None and json.loads(json.dumps(have)) != json.loads(json.dumps(want)):
            raise ValueError(f"cannot resume from {sp}: it was written with {key} = {have}, this run has {want} "
                             "(use another output_dir, or resume=never)")
    step = int(state["step"])
    head.load_state_dict(load_file(os.path.join(d, f"head_{step:08d}.safetensors")))
    tensors = load_file(os.path.join(d, f"optim_{step:08d}.safetensors"))
    per: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        per.setdefault(int(pid), {})[k] = v
    for key, v in state["optim_scalars"].items():
        pid, k = key.split(".", 1)
        per.setdefault(int(pid), {})[k] = torch.tensor(v)
    osd = opt.state_dict()
    osd["state"] = per
    for g, saved in zip(osd["param_groups"], state["param_groups"]):
        g.update({k: v for k, v in saved.items() if k in g})
    opt.load_state_dict(osd)
    return state


def run_training(
    cfg: ProbeConfig,
    head: nn.Module,
    epoch_batches: Callable[[int], Iterable],
    steps_per_epoch: int,
    loss_fn: Callable[[object], tuple[torch.Tensor, dict]],
    evaluate: Callable[[], dict] | None = None,
    groups: list[dict] | None = None,
    checkpoint_meta: dict | None = None,
) -> dict:
    """Train ``head`` and evaluate it; returns ``{"step", "losses", "eval"}``.

    AdamW over :func:`param_groups`, lr from :func:`cosine_lr`; writes ``OUT/metrics.jsonl``
    (one JSON object per logged step, the final evaluation as ``{"eval": {...}}``),
    ``OUT/results.json`` and, every ``save_every`` steps, :func:`save_checkpoint`; with
    ``resume = auto`` it starts from that checkpoint.

    ``epoch_batches(epoch, start)`` yields the batches of one epoch from batch ``start`` on, in
    a deterministic order (a function of the seed and epoch), so a resumed run starts after
    the batches already seen without loading them. ``loss_fn(batch) -> (loss, logs)``. The
    warm-up is ``cfg.warmup_steps``, or ``cfg.warmup_epochs`` x ``steps_per_epoch`` rounded.

    ``groups`` (optional) replaces :func:`param_groups` ``(head, cfg.weight_decay)``: AdamW
    groups each with its own ``weight_decay`` and ``lr_scale`` (its lr is the schedule's lr x
    ``lr_scale``, min_lr included), e.g. one set per head of a sweep. ``checkpoint_meta``
    (optional) is stored in the checkpoint; resuming from a checkpoint whose stored values
    differ (e.g. another set of heads) is a ValueError naming both.
    """
    if steps_per_epoch <= 0:
        raise ValueError("the training set yields no batches")
    out = cfg.output_dir
    os.makedirs(out, exist_ok=True)
    total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    warmup = warmup_steps(cfg, steps_per_epoch)
    groups = param_groups(head, cfg.weight_decay) if groups is None else groups
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    meta = dict(checkpoint_meta or {})
    step = 0
    if cfg.resume == "auto":
        state = load_checkpoint(out, head, opt, meta)
        if state is not None:
            step = int(state["step"])
    writer = MetricsWriter(os.path.join(out, "metrics.jsonl"))
    bar = Progress(total, step, enabled=cfg.progress)
    losses = []
    head.train()
    try:
        epoch, skip = divmod(step, steps_per_epoch)
        while step < total:
            for batch in epoch_batches(epoch, skip):
                if step >= total:
                    break
                lr = cosine_lr(step, total, cfg.lr, cfg.min_lr, warmup)
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                loss, logs = loss_fn(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"probe loss is {loss.item()} at step {step}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                lv = loss.detach().item()
                losses.append(lv)
                if step % cfg.log_every == 0 or step == total:
                    writer.write({"step": step, "epoch": epoch, "loss": lv, "lr": lr, **logs})
                bar.update(1, {"loss": lv})
                if step % cfg.save_every == 0 or step == total:
                    save_checkpoint(out, head, opt, step, {"total_steps": total, **meta})
            skip = 0
            epoch += 1
        bar.close()
        head.eval()
        results = evaluate() if evaluate is not None else {}
        writer.write({"step": step, "eval": results})
    finally:
        bar.close()
        writer.close()
    atomic_write_text(os.path.join(out, "results.json"), json.dumps({"step": step, **results}, indent=1))
    return {"step": step, "losses": losses, "eval": results}


def warmup_steps(cfg: ProbeConfig, steps_per_epoch: int) -> int:
    """Warm-up length in steps: ``warmup_steps``, else ``round(warmup_epochs * steps_per_epoch)``."""
    if cfg.warmup_steps > 0:
        return cfg.warmup_steps
    return int(round(cfg.warmup_epochs * steps_per_epoch))


def epoch_order(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Index batches of one epoch: a permutation drawn from (seed, epoch); the last short batch kept."""
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class KeyBatches(Sampler):
    """Batches of dataset keys ``(index, sample_seed)`` for one epoch at a time.

    The distinct samples of an epoch are :func:`epoch_order` batches of ``batch_size //
    repeats`` indices; with ``repeats`` k > 1 (repeated augmentation) each batch holds those
    indices k times, copy r after copy r - 1 (``[a, b, c, a, b, c]``), so a sample's copies
    never sit side by side (batch mixing that pairs neighbours pairs different clips) and
    every sample appears k times per epoch. Copy r of sample i in epoch e gets seed
    ``mix64(seed, e, i, r)``, a different augmentation draw per copy and epoch;
    ``fixed_seed`` gives every key that seed instead (one fixed view, e.g. for feature
    caching). :meth:`set_position` picks the epoch and first batch of the next iteration.
    """

    def __init__(self, n: int, batch_size: int, seed: int, repeats: int = 1, shuffle: bool = True,
                 fixed_seed: int | None = None):
        if repeats < 1 or batch_size % repeats:
            raise ValueError(f"batch size {batch_size} is not a multiple of the {repeats} repeats")
        self.n, self.per_batch, self.seed, self.repeats = n, batch_size // repeats, seed, repeats
        self.shuffle, self.fixed_seed = shuffle, fixed_seed
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return -(-self.n // self.per_batch)

    def batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        out = []
        for idx in epoch_order(self.n, self.per_batch, self.seed, epoch, self.shuffle):
            out.append([(i, self.fixed_seed if self.fixed_seed is not None else mix64(self.seed, epoch, i, r))
                        for r in range(self.repeats) for i in idx])
        return out

    def __iter__(self):
        yield from self.batches(self.epoch)[self.start:]


def make_loader(dataset, sampler: KeyBatches, num_workers: int, collate_fn, persistent: bool = True) -> DataLoader:
    """A DataLoader over ``sampler``'s key batches; with ``num_workers`` > 0 the workers are
    persistent (kept across epochs) unless ``persistent`` is False."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
                      persistent_workers=persistent and num_workers > 0,
                      prefetch_factor=2 if num_workers > 0 else None)
