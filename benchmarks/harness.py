"""Shared benchmark plumbing: environment record, GPU timing, results files.

Every benchmark result carries the device, the date, the commit, the library versions and
the full configuration of the measurement. Results go to ``benchmarks/results/`` as JSON
plus a Markdown table; nothing is asserted about speed.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def on_gpu() -> bool:
    return torch.cuda.is_available()


# Which GPU shapes the microbenchmarks run: IVFAST_BENCH_SHAPES=all (unset: the default, what
# `make bench` runs) or paper: only the shapes of the paper's Stage-1 configs (ViT-B and ViT-L,
# batch 16, 16 frames, 224 px, mask 0.8) in the dtypes the engine launches there; the extra
# shapes (the full clip through RMSNorm, 4x diffusion rows, a 32-frame table, varlen attention)
# are left out. The CPU shapes are the same either way. benchmarks/gpu_check.sh sets paper.
SHAPE_SETS = ("all", "paper")
SHAPE_PLANS: dict[str, dict] = {}  # benchmark -> GPU shapes, paper shapes (filled at import; the dry run prints it)


def shape_set() -> str:
    value = os.environ.get("IVFAST_BENCH_SHAPES", "").strip() or "all"
    if value not in SHAPE_SETS:
        raise ValueError(f"IVFAST_BENCH_SHAPES={value!r}: must be one of {', '.join(SHAPE_SETS)}")
    return value


def pick_shapes(name: str, gpu: list, cpu: list, paper: list) -> list:
    """The shapes benchmark ``name`` runs here: ``cpu`` without a GPU; on a GPU ``gpu``, or its
    subset ``paper`` when IVFAST_BENCH_SHAPES=paper."""
    missing = [s for s in paper if s not in gpu]
    if missing or not paper:
        raise ValueError(f"{name}: the paper shapes must be a non-empty subset of the GPU shapes ({missing})")
    SHAPE_PLANS[name] = {"gpu": list(gpu), "paper": list(paper)}
    if not on_gpu():
        return list(cpu)
    return list(paper) if shape_set() == "paper" else list(gpu)


def bench_device() -> torch.device:
    return torch.device("cuda" if on_gpu() else "cpu")


def environment() -> dict:
    """Who measured what where: device, date, commit, versions."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(RESULTS_DIR)).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                    cwd=os.path.dirname(RESULTS_DIR)).stdout.strip())
    except OSError:
        commit, dirty = "", False
    if not commit:  # no git history here (a device machine gets the files alone): the commit recorded
        commit, dirty = os.environ.get("IVFAST_COMMIT", "") or "unknown", False  # by gpu_check.sh, if any
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit + ("-dirty" if dirty else ""),
        "device": torch.cuda.get_device_name() if on_gpu() else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if on_gpu():
        env["cuda"] = torch.version.cuda
    return env


def gpu_time_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds per call of ``fn`` on the GPU (triton's do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def sync() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def time_ms(fn, reps: int = 5) -> float:
    """Milliseconds per call: do_bench median on a GPU, else the median of ``reps`` perf_counter runs."""
    if on_gpu():
        return gpu_time_ms(fn)
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def skip_unavailable(impl: str) -> None:
    """Skip a benchmark row whose implementation cannot run here: Triton without a GPU or the
    interpreter; torch.compile on the CPU unless IVFAST_BENCH_COMPILE=1 (compile time dominates)."""
    import pytest

    from ivfast.ops import dispatch

    if impl == "triton" and not dispatch.use_triton(torch.empty(0, device=bench_device())):
        pytest.skip("triton path: GPU, or CPU with TRITON_INTERPRET=1 set before the run")
    if impl == "compile" and not on_gpu() and os.environ.get("IVFAST_BENCH_COMPILE") != "1":
        print("torch.compile baseline skipped on CPU (compile time dominates at these sizes; "
              "IVFAST_BENCH_COMPILE=1 to include it)")
        pytest.skip("torch.compile baseline skipped on CPU (IVFAST_BENCH_COMPILE=1 to include it)")


def measure_mode(benchmark, mode: str, fwd, outputs, inputs, grads) -> float:
    """Time one of forward / backward / full of ``fwd`` with pytest-benchmark; returns ms per call.

    ``outputs`` is one forward's result (kept for ``backward``), ``inputs`` the tensors that
    receive gradients, ``grads`` the output gradients. A mode that cannot run here (a compiled
    graph that cannot be kept for retain_graph, ...) is skipped with the reason.
    """
    import pytest

    def forward():
        with torch.no_grad():
            fwd()
        sync()

    def backward():
        torch.autograd.grad(outputs, inputs, grads, retain_graph=True)
        sync()

    def full():
        torch.autograd.grad(fwd(), inputs, grads)
        sync()

    fn = {"forward": forward, "backward": backward, "full": full}[mode]
    try:
        fn()
    except RuntimeError as e:
        pytest.skip(f"{mode} not measurable here: {e}")
    benchmark(fn)
    return time_ms(fn)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = gpu_time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def write_results(name: str, config: dict, rows: list[dict]) -> str:
    """Write ``<name>-<device>-<date>.json`` and ``.md`` under benchmarks/results; returns the JSON path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    env = environment()
    tag = "gpu" if on_gpu() else "cpu"
    stem = os.path.join(RESULTS_DIR, f"{name}-{tag}-{env['date'][:10]}")
    with open(stem + ".json", "w") as f:
        json.dump({"benchmark": name, "environment": env, "config": config, "results": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# {name}\n\n")
        f.write("\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n\n")
        f.write("Config: `" + json.dumps(config) + "`\n\n")
        if rows:
            cols = list(rows[0])
            f.write("| " + " | ".join(cols) + " |\n| " + " | ".join("---" for _ in cols) + " |\n")
            for r in rows:
                f.write("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |\n")
    return stem + ".json"


def write_kernel_results(name: str, config: dict, rows: list[dict]) -> str | None:
    """``write_results`` for a kernel benchmark: adds how it was timed, whether the Triton path
    ran, and on a GPU the measured copy bandwidth with each row's share of it (rows with ``gbs``)."""
    if not rows:
        return None
    from ivfast.ops import dispatch

    config = {**config, "shapes": shape_set(),
              "timing": "triton do_bench median" if on_gpu() else "perf_counter median of 5",
              "triton_path": dispatch.use_triton(torch.empty(0, device=bench_device()))}
    if on_gpu():
        config["copy_bandwidth_gbs"] = round(copy_bandwidth_gbs(), 1)
        for r in rows:
            if r.get("gbs") is not None:
                r["pct_copy_bw"] = round(100 * r["gbs"] / config["copy_bandwidth_gbs"], 1)
    path = write_results(name, config, rows)
    print("\nresults:", path)
    return path


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
