"""The memory report: per row the paper's figure, the release's way and ivfast's way (modelled),
and ivfast measured on a GPU; written as Markdown and a PNG bar chart.

A row is one config at a batch size, frame count and mask ratio. The default rows are the
paper's memory table (supplement Table 1: one A100, batch 16, 16 frames, mask 0.8).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field

from ivfast.config import Config, load_config
from ivfast.memory import analytic
from ivfast.memory.analytic import CUDA_CONTEXT_GIB, GIB, MemoryEstimate

PAPER_ROWS = (
    ("Align only", "configs/stage1_b_align.yaml", 22.0),
    ("Align + Linear Recon", "configs/stage1_b_linear.yaml", 41.0),
    ("Align + Diffusion Recon", "configs/stage1_b_diffusion.yaml", 48.0),
)
CHECKPOINT_ALL = ("encoder", "predictor", "diffusion")
RELEASE_CTOR_HEAD = (3, 1024)  # diffusion head depth, width: the release constructor's defaults


@dataclass
class Row:
    name: str
    config: str
    paper_gib: float | None
    release: MemoryEstimate
    ivfast: MemoryEstimate
    ivfast_ckpt: MemoryEstimate
    release_bf16_head: MemoryEstimate | None = None  # diagnostic: the release's way, diffusion head in bf16
    release_small_head: MemoryEstimate | None = None  # diagnostic: the release's way, constructor-default head
    measured_gib: float | None = None
    measured_phases: dict = field(default_factory=dict)


def row_config(path: str, batch: int | None, frames: int | None, mask: float | None, overrides=()) -> Config:
    ov = list(overrides)
    if batch is not None:
        ov.append(f"data.batch_size={batch}")
    if frames is not None:
        ov.append(f"data.num_frames={frames}")
    if mask is not None:
        ov.append(f"model.mask_ratio={mask}")
    return load_config(path, ov)


def build_row(name: str, path: str, cfg: Config, paper: float | None, zero: int, world: int) -> Row:
    params = analytic.count_params(cfg)
    est = lambda way: analytic.estimate(cfg, way, zero, world, params)  # noqa: E731
    row = Row(name, path, paper, est(analytic.release_way(cfg)), est(analytic.ivfast_way(cfg)),
              est(analytic.ivfast_way(cfg, CHECKPOINT_ALL)))
    if cfg.model.recon == "diffusion":
        row.release_bf16_head = est(dataclasses.replace(analytic.release_way(cfg), diffusion_bytes=2))
        small = copy.deepcopy(cfg)
        small.model.diffusion.depth, small.model.diffusion.width = RELEASE_CTOR_HEAD
        row.release_small_head = analytic.estimate(small, analytic.release_way(small), zero, world)
    return row


def _g(x: float) -> str:
    return f"{x / GIB:.2f}"


def markdown(rows: list[Row], zero: int, world: int) -> str:
    out = ["# ivfast memory report", "",
           f"One training step, ZeRO stage {zero}, world size {world}; GiB per GPU. Modelled figures include "
           f"{CUDA_CONTEXT_GIB} GiB of CUDA context (nvidia-smi sees it, torch does not).", "",
           "| row | paper | release's way (model) | vs paper | ivfast (model) | ivfast + checkpointing (model) "
           "| ivfast measured |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        rel = r.release.gib()
        vs = f"{(rel / r.paper_gib - 1) * 100:+.0f}%" if r.paper_gib else "-"
        meas = f"{r.measured_gib:.2f}" if r.measured_gib is not None else "-"
        out.append(f"| {r.name} | {r.paper_gib if r.paper_gib else '-'} | {rel:.2f} | {vs} | {r.ivfast.gib():.2f} "
                   f"| {r.ivfast_ckpt.gib():.2f} | {meas} |")
    for r in rows:
        if r.release_bf16_head is not None:
            out += ["", f"{r.name}: the release's way with its diffusion head in bf16 instead of fp32 (the only "
                        f"change) models {r.release_bf16_head.gib():.2f} GiB; the fp32 head's activations are "
                        f"{r.release.activations['diffusion head'] / GIB:.2f} GiB of the "
                        f"{r.release.gib():.2f}. The head's bytes per row are checked against the release's own "
                        f"code run on the CPU: `benchmarks/release_head_memory.py` "
                        f"(results in `benchmarks/results/release_head_memory-cpu-*.md`)."]
        if r.release_small_head is not None:
            d, w = RELEASE_CTOR_HEAD
            vs = f" ({(r.release_small_head.gib() / r.paper_gib - 1) * 100:+.1f}% vs the paper)" if r.paper_gib else ""
            out += ["", f"{r.name}, diagnostic (a hypothesis for the paper's ablation, not a fact): the release's way "
                        f"with the release constructor's default diffusion head (depth {d}, width {w}: "
                        f"`InternVideo_next_s1.py` defaults `diffloss_d={d}, diffloss_w={w}`; its registered models "
                        f"use 6 / 1536) models {r.release_small_head.gib():.2f} GiB{vs}."]
    for r in rows:
        out += ["", f"## {r.name} (`{r.config}`)", "",
                f"Parameters: {r.release.params.total_trainable / 1e6:.2f} M trainable "
                f"({', '.join(f'{k} {v / 1e6:.2f} M' for k, v in r.release.params.trainable.items())}); "
                f"teacher {r.release.params.teacher / 1e6:.2f} M frozen.", "",
                "| GiB | release's way | ivfast | ivfast + checkpointing |", "| --- | --- | --- | --- |"]
        ests = (r.release, r.ivfast, r.ivfast_ckpt)
        keys = []
        for e in ests:
            keys += [("static", k) for k in e.static if ("static", k) not in keys]
        for e in ests:
            keys += [("act", k) for k in e.activations if ("act", k) not in keys]
        for kind, k in keys:
            label = k if kind == "static" else f"activations: {k}"
            vals = [(e.static if kind == "static" else e.activations).get(k, 0.0) for e in ests]
            out.append(f"| {label} | " + " | ".join(_g(v) for v in vals) + " |")
        out.append("| live teacher outputs | " + " | ".join(_g(e.teacher_outputs) for e in ests) + " |")
        out.append("| largest transient | " + " | ".join(
            f"{_g(max(e.transients.values()))} ({max(e.transients, key=e.transients.get)})" for e in ests) + " |")
        for ph in r.release.phases:
            out.append(f"| phase peak: {ph} | " + " | ".join(_g(e.phases[ph]) for e in ests) + " |")
        if r.measured_phases:
            out += ["", "Measured peaks per phase (MiB): " + ", ".join(
                f"{k} {v:.0f}" for k, v in r.measured_phases.items())]
    out += ["", "## Assumptions", "", analytic.ASSUMPTIONS.rstrip(), ""]
    return "\n".join(out)


def bar_chart(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("paper", [r.paper_gib or 0.0 for r in rows]),
              ("release's way (model)", [r.release.gib() for r in rows]),
              ("ivfast (model)", [r.ivfast.gib() for r in rows]),
              ("ivfast + checkpointing (model)", [r.ivfast_ckpt.gib() for r in rows])]
    if any(r.measured_gib is not None for r in rows):
        series.append(("ivfast measured", [r.measured_gib or 0.0 for r in rows]))
    fig, ax = plt.subplots(figsize=(2.2 + 2.4 * len(rows), 4.5))
    width = 0.8 / len(series)
    for i, (label, vals) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        bars = ax.bar(xs, vals, width, label=label)
        ax.bar_label(bars, labels=[f"{v:.0f}" if v else "" for v in vals], fontsize=7)
    ax.set_xticks(range(len(rows)), [r.name for r in rows], fontsize=8)
    ax.set_ylabel("GiB per GPU")
    ax.set_title("Stage-1 training memory per GPU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(rows: list[Row], out_dir: str, zero: int, world: int) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    md, png = os.path.join(out_dir, "memory_report.md"), os.path.join(out_dir, "memory_report.png")
    with open(md, "w") as f:
        f.write(markdown(rows, zero, world))
    bar_chart(rows, png)
    return md, png
