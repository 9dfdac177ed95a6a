"""Every Triton kernel of the Stage-1 step compiled ahead of time for sm_80 and sm_90a at the
shapes of run configs, no GPU needed.

    python -m ivfast.compile_check            # ViT-B, ViT-L (paper) and tiny; exit 1 on a failure
    python -m ivfast.compile_check --write    # + benchmarks/results/compile-<date>.{md,json}

A config is read by the run-config loader (``ivfast.config``: the same ``base:`` chain,
defaults, overrides and validation as training) and reduced to the few numbers that shape a
kernel launch (:func:`step_shapes`); :mod:`ivfast.ops.compile_check` derives, compiles and
reports the launches of those shapes. Exit 1 on a compile error, any spill, or a compile slower
than ``--max-compile-s``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from ivfast.config import Config, chunking_allowed, load_config
from ivfast.masks import num_reconstructed
from ivfast.memory.analytic import shapes
from ivfast.models.encoder import encoder_kwargs
from ivfast.ops import dispatch
from ivfast.ops import compile_check as CC

DEFAULT_CONFIGS = ("stage1_b_diffusion", "stage1_l_diffusion", "tiny")


def step_shapes(cfg: Config, name: str) -> CC.StepShapes:
    """The launch-shaping numbers of ``cfg``'s Stage-1 step: the token grid and the visible and
    masked tokens per clip as the memory model counts them (:func:`ivfast.memory.analytic.shapes`),
    the diffusion head's rows (:func:`ivfast.masks.num_reconstructed`) and its chunk (0 where
    the chunked loss cannot run: :func:`ivfast.config.chunking_allowed`)."""
    d, m = cfg.data, cfg.model
    e, df = m.encoder, m.diffusion
    s = shapes(cfg)
    side = d.img_size // e.patch_size
    in_chans = encoder_kwargs(e, num_frames=d.num_frames, img_size=d.img_size)["in_chans"]
    return CC.StepShapes(
        name=name, batch=s.batch, grid=(s.frames, side, side), visible=s.visible, masked=s.masked,
        recon_rows=num_reconstructed(s.masked, float(df.reconstruction_ratio)), num_cls=s.cls,
        enc_width=e.width, enc_depth=e.depth, release_blocks=e.block == "release",
        pos_learnable=bool(e.pos_learnable), patch_dim=in_chans * e.tubelet_size * e.patch_size ** 2,
        recon=m.recon, pred_width=m.predictor.width, diff_width=df.width, diff_depth=df.depth,
        learn_sigma=bool(df.learn_sigma), batch_mul=df.batch_mul, num_timesteps=df.num_timesteps,
        head_precision=df.precision, chunk_rows=int(df.chunk_rows) if chunking_allowed(cfg.deepspeed.zero_stage) else 0,
        fused=bool(m.fused_kernels))


def config_shapes(name: str) -> CC.StepShapes:
    """:func:`step_shapes` of a config name or path, named by the file's stem."""
    return step_shapes(load_config(name), os.path.splitext(os.path.basename(name))[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ivfast.compile_check", description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="config names or paths")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    ap.add_argument("--no-cache", action="store_true", help="compile everything, read and write no cache")
    ap.add_argument("--cache-dir", default=None, help=f"default {CC.cache_dir()}")
    ap.add_argument("--arch", nargs="+", type=int, default=[80, 90], choices=[80, 90])
    ap.add_argument("--kernels", default=None, help="only kernels whose name contains this")
    ap.add_argument("--max-compile-s", type=float, default=CC.MAX_COMPILE_S)
    ap.add_argument("--no-roofline", action="store_true", help="skip the per-kernel roofline")
    ap.add_argument("--table", action="store_true", help="print every build (default: problems and a summary)")
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/compile-<date>.{md,json}")
    ap.add_argument("--out-dir", default=os.path.join(CC.ROOT, "benchmarks", "results"))
    args = ap.parse_args(argv)
    if dispatch.interpreting():  # the kernels must be real JIT functions: run again without the interpreter
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "ivfast.compile_check",
                               *(argv if argv is not None else sys.argv[1:])], env=env).returncode
    shapes = [config_shapes(c) for c in args.configs]
    cache = None if args.no_cache else (args.cache_dir or CC.cache_dir())
    report = CC.run(shapes, jobs=args.jobs, cache=cache, archs=tuple(args.arch),
                    max_compile_s=args.max_compile_s, kernels=args.kernels)
    launches = report.pop("_launches")
    rows = report["rows"]
    if args.table or args.write:
        print(CC.table(rows))
    bad = [r for r in rows if r["problems"]]
    for r in bad:
        print(f"PROBLEM {r['kernel']} {r['dtype']} sm_{r['arch']} {r['tiles']} {r['flags']}: "
              + "; ".join(r["problems"]))
    s = report["summary"]
    print(json.dumps(s, indent=1))
    cached = sum(1 for r in rows if r.get("cached"))
    print(f"{s['builds']} builds ({cached} cached) of {s['kernels']} kernels in {report['wall_s']:.1f} s "
          f"(derivation {report['derive_s']:.1f} s); {len(bad)} with problems")
    roof_md = ""
    if not args.no_roofline:
        from ivfast.ops import roofline

        paper = {x.name for x in shapes if x.name.startswith("stage1_")}
        roof = roofline.kernel_table({key: recs for key, recs in launches.items()
                                      if key[0] in paper and key[1] == "bf16"})
        report["roofline"] = roof["json"]
        roof_md = roof["markdown"]
        print(roof_md)
    if args.write:
        md, js = CC.write_results(report, CC.markdown(report, roof_md), args.out_dir, report["date"])
        print(f"wrote {md} and {js}")
    return CC.exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
