"""The Stage-1 step's modelled lower bound: a target for the first GPU measurement.

    python -m benchmarks.roofline            # ViT-B, the paper's memory-table row 3 (stage1_b_diffusion)
    python -m benchmarks.roofline --write    # + its section in benchmarks/results/compile-<date>.{md,json}

lower bound = the step's FLOPs at the dense bf16 tensor-core peak
            + the roofline time of every fused-kernel launch of the step (ivfast.ops.roofline)

- FLOPs: ``ivfast.training.flops.count_step_flops`` (``torch.utils.flop_counter`` over the real
  Stage-1 model on fake tensors, the count behind the trainer's MFU): the frozen teacher's
  forward, the student's forward and backward, attention as matmuls with the predictor's windowed
  layers counting only the pairs inside their windows, the diffusion head unchunked (the same
  FLOPs).
- Kernel launches: the same model's forward and backward on ``meta`` under
  ``ivfast.ops.launch.capture``, planned for each device's SM count: every Triton launch of the
  step, each at max(bytes / HBM bandwidth, FLOPs / fp32 peak, integer ops / INT32 peak).

What the bound leaves out (so a measured step is above it): the memory traffic of the torch ops
that are not fused kernels (attention, GELU, LayerNorms of the predictor, the teacher's
elementwise work, the optimiser step), kernel launch gaps, the data loader, and every
matmul below its peak. The layering puts this here, not in ``ivfast.ops`` (which may not import
the models or the config): ``ivfast.ops.roofline`` has the per-kernel model, this module the step.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ivfast.ops import compile_check, dispatch, launch, roofline  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW3 = "stage1_b_diffusion"


def build_meta_step(config: str, overrides=()):
    """(cfg, Stage1Step) with the model and the teacher on the ``meta`` device."""
    from ivfast.config import load_config
    from ivfast.training.step import Stage1Step

    cfg = load_config(config, list(overrides))
    with torch.device("meta"):
        step = Stage1Step(cfg)
    return cfg, step


def meta_inputs(cfg, step, dtype: torch.dtype):
    """The arguments of ``Stage1Model.forward`` on ``meta``, shaped as ``Stage1Step.prepare``
    shapes them (the mask keeps L - int(L * ratio) tokens per frame: ``ivfast.memory.analytic``)."""
    from ivfast.masks import num_reconstructed
    from ivfast.memory.analytic import shapes
    from ivfast.training.step import Stage1Inputs

    s = shapes(cfg)
    b, d, m = s.batch, cfg.data, cfg.model
    meta = dict(device="meta")
    recon = num_reconstructed(s.masked, m.diffusion.reconstruction_ratio)
    rows = b * m.diffusion.batch_mul * recon
    tw = m.teacher.width
    return Stage1Inputs(
        video=torch.empty(b, 3, d.num_frames, d.img_size, d.img_size, dtype=dtype, **meta),
        visible_idx=torch.empty(b, s.visible, dtype=torch.int64, **meta),
        recon_idx=torch.empty(b, recon, dtype=torch.int64, **meta) if m.recon != "none" else None,
        teacher_layers=torch.empty(m.align.num_layers, b, s.visible, tw, dtype=dtype, **meta),
        teacher_pooled=torch.empty(b * d.num_frames, tw, dtype=dtype, **meta),
        diffusion_t=torch.empty(rows, dtype=torch.int64, **meta) if m.recon == "diffusion" else None,
        diffusion_seeds=torch.empty(rows, dtype=torch.int64, **meta) if m.recon == "diffusion" else None)


def model_launches(config: str, mode: compile_check.Mode, target: launch.Target, overrides=()) -> list:
    """Every Triton launch of the real Stage-1 model's forward + backward in ``mode`` (the model
    cast whole to its dtype, as DeepSpeed does; ``mode.head_fp32``: ``model.diffusion.precision``),
    planned for ``target``, on ``meta``."""
    ov = list(overrides)
    if mode.head_fp32 is not None:
        ov.append(f"model.diffusion.precision={'fp32' if mode.head_fp32 else 'auto'}")
    cfg, step = build_meta_step(config, ov)
    model = step.model.to(mode.dtype)
    inputs = meta_inputs(cfg, step, mode.dtype)
    with dispatch.override(fused=cfg.model.fused_kernels, lean=cfg.model.lean_saves), \
            launch.capture(target) as records:
        out = model(*inputs)
        out["loss"].backward()
    return list(records)


def step_flops(config: str = ROW3, overrides=()) -> dict:
    """FLOPs of one Stage-1 step (``ivfast.training.flops.count_step_flops``, the count the
    trainer's MFU uses): the teacher's forward, the student's forward and backward."""
    from ivfast.config import load_config
    from ivfast.training.flops import count_step_flops

    f = count_step_flops(load_config(config, list(overrides)))
    return {"teacher_forward": f.teacher_forward, "student_forward": f.student_forward,
            "student_backward": f.student_backward, "total": f.per_step}


def step_bound(config: str = ROW3, overrides=()) -> dict:
    """The modelled lower bound of one step on each device of ``ivfast.ops.roofline.DEVICES``."""
    flops = step_flops(config, overrides)
    mode = compile_check.MODES[0]
    by_target = {t.name: model_launches(config, mode, t, overrides) for t in launch.GPU_TARGETS}
    rows = roofline.step_rows({d.name: by_target[roofline.TARGET_OF[d.name].name] for d in roofline.DEVICES})
    kernels = roofline.totals(rows)
    out = {"config": config, "flops": flops, "kernel_rows": rows, "devices": {}}
    for d in roofline.DEVICES:
        t_flops = flops["total"] / d.bf16_flops
        t_kern = kernels[d.name]["ms"] / 1e3
        out["devices"][d.name] = {"matmul_ms": round(t_flops * 1e3, 2), "kernels_ms": round(t_kern * 1e3, 2),
                                  "kernels_gb": kernels[d.name]["gb"], "bound_ms": round((t_flops + t_kern) * 1e3, 2)}
    return out


def markdown(bound: dict) -> str:
    f = bound["flops"]
    lines = [
        f"Config `{bound['config']}` (the paper's memory-table row 3: ViT-B, batch 16, 16 frames, 224 px, mask 0.8), "
        "bf16, `python -m benchmarks.roofline --write`. Lower bound = the step's FLOPs at the dense bf16 peak + "
        "the roofline time of every fused-kernel launch (the table above, summed over the step). Not counted: "
        "the traffic of the torch ops that are not fused kernels (attention, GELU, the predictor's "
        "LayerNorms, the optimiser), launch gaps, data loading, matmuls below peak.", "",
        f"FLOPs per step (ivfast.training.flops.count_step_flops): teacher forward "
        f"{f['teacher_forward'] / 1e12:.2f} T, student forward {f['student_forward'] / 1e12:.2f} T, "
        f"student backward {f['student_backward'] / 1e12:.2f} T; total **{f['total'] / 1e12:.2f} TFLOP**.", "",
        "| device | matmul time at bf16 peak (ms) | fused kernels at roofline (ms) | their bytes (GB) | "
        "lower bound (ms/step) | clips/s at the bound |",
        "| --- | --- | --- | --- | --- | --- |"]
    clips = 16
    for name, v in bound["devices"].items():
        lines.append(f"| {name} | {v['matmul_ms']:.1f} | {v['kernels_ms']:.2f} | {v['kernels_gb']:.1f} | "
                     f"**{v['bound_ms']:.1f}** | {clips / (v['bound_ms'] / 1e3):.0f} |")
    return "\n".join(lines)


def write(bound: dict, out_dir: str, date: str) -> tuple[str, str]:
    """Put the bound into ``compile-<date>.md`` (between the step-bound markers) and ``.json``."""
    md_path = os.path.join(out_dir, f"compile-{date}.md")
    js_path = os.path.join(out_dir, f"compile-{date}.json")
    if not os.path.isfile(md_path):
        raise FileNotFoundError(f"{md_path}: run `python -m ivfast.compile_check --write` first")
    begin, end = compile_check.STEP_BEGIN, compile_check.STEP_END
    with open(md_path) as f:
        text = f.read()
    block = f"{begin}\n{markdown(bound)}\n{end}"
    text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    with open(md_path, "w") as f:
        f.write(text)
    with open(js_path) as f:
        js = json.load(f)
    js["step_bound"] = {k: v for k, v in bound.items() if k != "kernel_rows"}
    compile_check.dump_json(js, js_path)
    return md_path, js_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=ROW3)
    ap.add_argument("--write", action="store_true", help="into benchmarks/results/compile-<date>.{md,json}")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # model-building logs stay off the report
        bound = step_bound(args.config)
    print(markdown(bound))
    if args.write:
        md, js = write(bound, args.out_dir, args.date)
        print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
