"""The release's own diffusion head, measured on the CPU: bytes autograd saves per row.

The memory table's third row (Align + Diffusion Recon, 48 GB in the paper) is where the
analytic model of the release's way disagrees with the paper (ivfast-memory report). Almost
all of that row's extra memory is the diffusion head's activations, and they scale with the
rows (batch x masked tokens = 52,224 at batch 16, 16 frames, mask 0.8). This script settles
the per-row figure without a GPU and without trusting ivfast's reimplementation: it imports
the head from a checkout of the authors' release (``OpenGVLab/InternVideo``, folder
``InternVideo-Next``; nothing of it is copied into ivfast), runs its ``DiffLoss`` forward in
float32 on the CPU, which is what the release's ``autocast(dtype=torch.float32)`` gives on
CUDA, and measures what autograd keeps for backward (:func:`ivfast.memory.saved_tensors.saved_bytes`).
The condition z is handed over in bf16 and cast inside, as autocast does with the
predictor's bf16 output; the fp32 copies autocast makes of the bf16 weights are static and
come from the analytic model.

Per head setting it prints the measured bytes per row next to the analytic model's, and the
whole step's modelled peak with the head's modelled activations replaced by the measured
ones. Results go to ``benchmarks/results/release_head_memory-cpu-<date>.{json,md}`` with
``--write``.

    python benchmarks/release_head_memory.py --release PATH_TO_InternVideo [--rows 512] [--write]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import write_results  # noqa: E402
from ivfast.config import load_config  # noqa: E402
from ivfast.memory import analytic  # noqa: E402
from ivfast.memory.saved_tensors import saved_bytes  # noqa: E402

CONFIG = "configs/stage1_b_diffusion.yaml"
HEADS = ((6, 1536, "registered internvideo_next_stage1_* models, paper Algorithm 1"),
         (3, 1024, "InternVideo2 constructor defaults"))


def load_release_diffloss(release: str):
    """The ``DiffLoss`` class of the release checkout at ``release`` (its ``diffusion`` package on sys.path)."""
    root = os.path.join(release, "InternVideo-Next")
    path = os.path.join(root, "models", "diffloss.py")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found: --release must be a checkout of OpenGVLab/InternVideo")
    sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("release_diffloss", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.DiffLoss


def release_commit(release: str) -> str:
    try:
        out = subprocess.run(["git", "-C", release, "rev-parse", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def measure_head(diffloss_cls, depth: int, width: int, c: int, z_dim: int, rows: int, seed: int = 0) -> dict:
    """Bytes saved per row by one training forward of the release head: ``embed + blocks``
    (timestep, condition and input embeddings, the residual blocks), ``final`` and ``loss``
    (the diffusion losses, outside the net), and ``total``."""
    torch.manual_seed(seed)
    net = diffloss_cls(target_channels=c, z_channels=z_dim, depth=depth, width=width, num_sampling_steps="100")
    z = torch.randn(rows, z_dim, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randn(rows, c)
    comps = {"final": net.net.final_layer, "embed + blocks": net.net}
    got, loss = saved_bytes(lambda: net(target=target, z=z.float()), params=list(net.parameters()),
                            exclude=[z, target], components=comps)
    loss.backward()  # the graph is whole: the saved tensors are what backward needs
    per_row = {k: got.by_component.get(k, 0) / rows for k in ("embed + blocks", "final")}
    per_row["loss"] = got.by_component.get("other", 0) / rows
    per_row["total"] = got.total / rows
    return per_row


def model_per_row(cfg, way) -> dict:
    """The analytic model's bytes per row of the head, split as :func:`measure_head` splits them."""
    parts = analytic.diffusion_head_rows(cfg, way)
    return {"embed + blocks": parts["embed"] + parts["blocks"], "final": parts["final"], "loss": parts["loss"],
            "total": sum(parts.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", required=True, help="a checkout of OpenGVLab/InternVideo")
    ap.add_argument("--release-commit", default=None,
                    help="the release's commit, when --release is an export without .git")
    ap.add_argument("--rows", type=int, default=512, help="rows per measurement (bytes per row do not depend on it)")
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/release_head_memory-cpu-<date>.*")
    args = ap.parse_args(argv)

    diffloss_cls = load_release_diffloss(args.release)
    base = load_config(CONFIG)
    s = analytic.shapes(base)
    paper_rows = s.batch * s.masked * base.model.diffusion.batch_mul
    results = []
    for depth, width, source in HEADS:
        cfg = copy.deepcopy(base)
        cfg.model.diffusion.depth, cfg.model.diffusion.width = depth, width
        way = analytic.release_way(cfg)
        est = analytic.estimate(cfg, way)
        c = 3 * cfg.model.encoder.tubelet_size * cfg.model.encoder.patch_size ** 2
        got = measure_head(diffloss_cls, depth, width, c, cfg.model.predictor.width, args.rows)
        want = model_per_row(cfg, way)
        # the modelled head's per-row bytes swapped for the measured ones (its fp32 weight copies stay)
        swap = (got["total"] - want["total"]) * paper_rows
        measured_head = est.activations["diffusion head"] + swap
        step_gib = (est.peak + swap) / analytic.GIB + analytic.CUDA_CONTEXT_GIB
        row = {"head": f"depth {depth}, width {width}", "source": source,
               **{f"measured {k} B/row": int(v) if float(v).is_integer() else round(v, 1) for k, v in got.items()},
               "model B/row": want["total"],
               "model - measured B/row": round(want["total"] - got["total"], 1),
               "head activations GiB (measured x rows)": round(measured_head / analytic.GIB, 2),
               "step peak GiB (model, measured head)": round(step_gib, 2),
               "vs paper 48": f"{(step_gib / 48 - 1) * 100:+.1f}%"}
        results.append(row)
        for k, v in row.items():
            print(f"{k}: {v}")
        print()
    if args.write:
        config = {"release": "OpenGVLab/InternVideo", "release_commit": args.release_commit or release_commit(args.release),
                  "release_files": "InternVideo-Next/models/diffloss.py, InternVideo-Next/diffusion/",
                  "ivfast_config": CONFIG, "rows_measured": args.rows, "rows_in_the_step": paper_rows,
                  "dtype": "float32 activations (autocast(dtype=float32) on CUDA), z handed over in bf16",
                  "target_channels": c, "z_channels": base.model.predictor.width, "learn_sigma": True,
                  "step": "batch 16, 16 frames, mask 0.8, ViT-B, one GPU, ZeRO-1; GiB incl. "
                          f"{analytic.CUDA_CONTEXT_GIB} GiB CUDA context"}
        print("results:", write_results("release_head_memory", config, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
