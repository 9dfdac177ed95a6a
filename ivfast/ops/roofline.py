"""Roofline of the ivfast.ops kernels: what each launch must move and compute, and the time that
implies at a device's peaks, so that a GPU measurement has a floor to be compared with.

:func:`work` reads a launch recorded by ``ivfast.ops.launch.capture`` (its arguments, flags and
tiles) and returns the essential work: bytes (every element of every tensor the launch uses read
or written once; per-position tables and small vectors once; the float32 partial rows of the
column sums included), FLOPs (float32 arithmetic, transcendental functions counted as
:data:`SINCOS_FLOPS` / :data:`BOX_MULLER_FLOPS`) and 32-bit integer operations (the Philox
rounds, on the padded tile as the kernels compute them). :func:`seconds` turns that into
time at a :class:`Device`'s peak HBM bandwidth, float32 (non-tensor) and INT32 throughput:
the launch's roofline time is the largest of the three. FLOP and integer counts per element
are estimates (instruction counts of the formulas, not of the SASS); bytes are exact.

Peaks (dense, no sparsity):

- A100 SXM4 80GB: 2,039 GB/s HBM2e, 312 TFLOP/s bf16 tensor, 19.5 TFLOP/s fp32 (NVIDIA A100
  Tensor Core GPU datasheet); INT32 108 SMs x 64 lanes x 1.41 GHz = 9.7 Tops/s (A100 whitepaper).
- H100 SXM5 80GB: 3.35 TB/s HBM3, 989 TFLOP/s bf16 tensor, 67 TFLOP/s fp32 (NVIDIA H100
  datasheet); INT32 132 SMs x 64 lanes x 1.98 GHz = 16.7 Tops/s (H100 whitepaper: 64 INT32
  lanes per SM; the clock that gives 67 TFLOP/s fp32 with 16,896 lanes).
- H200 SXM 141GB: 4.8 TB/s HBM3e, the H100's compute (NVIDIA H200 datasheet).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ivfast.ops import launch


@dataclass(frozen=True)
class Device:
    name: str
    hbm_bytes_s: float
    bf16_flops: float  # dense tensor-core peak
    fp32_flops: float  # non-tensor (an FMA counts 2)
    int32_ops: float
    source: str


A100 = Device("A100 SXM4 80GB", 2.039e12, 312e12, 19.5e12, 108 * 64 * 1.41e9,
              "NVIDIA A100 datasheet (SXM4 80GB); INT32 from the A100 whitepaper (64 lanes/SM, 1.41 GHz)")
H100 = Device("H100 SXM5 80GB", 3.35e12, 989e12, 67e12, 132 * 64 * 1.98e9,
              "NVIDIA H100 datasheet (SXM5); INT32 from the H100 whitepaper (64 lanes/SM, 1.98 GHz)")
H200 = Device("H200 SXM 141GB", 4.8e12, 989e12, 67e12, 132 * 64 * 1.98e9,
              "NVIDIA H200 datasheet (SXM); compute as the H100 SXM")
DEVICES = (A100, H100, H200)
TARGET_OF = {A100.name: launch.A100, H100.name: launch.H100, H200.name: launch.H100}  # SM counts: 108, 132, 132

PHILOX_INT_OPS = 70  # one tl.randn: 10 rounds x (2 wide multiplies, 2 three-input xors, 2 key adds) + setup
BOX_MULLER_FLOPS = 20  # uniform conversion, log, sqrt, cos (libdevice) and the scalings
SINCOS_FLOPS = 20  # one libdevice sin or cos in float32
SINCOS3D_INT_OPS = 20  # the token index -> (t, y, x) divisions and the channel selection
ADD_POS_SINCOS_FLOPS = SINCOS_FLOPS + 5  # exp2 for omega, the angle, the add


class Work(NamedTuple):
    bytes: float
    flops: float
    int_ops: float


def _es(arg) -> int:
    return arg.dtype.itemsize


def _named(rec) -> tuple[dict, dict]:
    return dict(zip(rec.arg_names, rec.args)), dict(rec.launch.constexprs)


def _pad(n: int, block: int) -> int:
    return launch.cdiv(n, block) * block


def _adaln(rec, a, c) -> Work:
    M, N = a["M"], a["N"]
    k = rec.name.split(".")[1]
    if k == "ln_mod_fwd":
        per = _es(a["X"]) + _es(a["SHIFT"]) + _es(a["SCALE"]) + _es(a["OUT"])
        extra = (2 * N * _es(a["W"]) if c["HAS_AFFINE"] else 0) + (8 * M if c["SAVE_STATS"] else 0)
        return Work(M * N * per + extra, M * N * (8 + 2 * c["HAS_AFFINE"]), 0)
    if k == "ln_mod_bwd":
        per = _es(a["X"]) + _es(a["SCALE"]) + _es(a["DOUT"]) + _es(a["DX"]) + _es(a["DSCALE"])
        per += (_es(a["DRES"]) if c["HAS_DRES"] else 0) + (_es(a["DSHIFT"]) if c["WRITE_DSHIFT"] else 0)
        per += (_es(a["SHIFT"]) + _es(a["HMOD"])) if c["RECOMPUTE"] else 0
        part = rec.launch.grid[0] * N * 4 * (2 * c["HAS_AFFINE"] + 2 * c["COLSUM"])
        extra = 8 * M + (2 * N * _es(a["W"]) if c["HAS_AFFINE"] else 0) + part
        return Work(M * N * per + extra, M * N * (16 + 4 * c["HAS_AFFINE"] + 2 * c["COLSUM"] + 3 * c["RECOMPUTE"]), 0)
    if k == "bias_silu_fwd":
        return Work(M * N * (_es(a["A"]) + _es(a["OUT"])) + N * 4, M * N * 6, 0)
    if k == "bias_silu_bwd":
        per = _es(a["A"]) + _es(a["DS"]) + _es(a["DA"]) + (_es(a["S"]) if c["RECOMPUTE"] else 0)
        part = rec.launch.grid[0] * N * 4 if c["HAS_BIAS"] else 0
        return Work(M * N * per + N * 4 + part, M * N * 10, 0)
    if k == "gated_fwd":
        return Work(M * N * (_es(a["X"]) + _es(a["GATE"]) + _es(a["H"]) + _es(a["OUT"])), M * N * 2, 0)
    if k == "gated_bwd":
        per = _es(a["DOUT"]) + _es(a["GATE"]) + _es(a["H"]) + _es(a["DGATE"]) + _es(a["DH"])
        part = rec.launch.grid[0] * 2 * N * 4 if c["COLSUM"] else 0
        return Work(M * N * per + part, M * N * (2 + 2 * c["COLSUM"]), 0)
    raise KeyError(rec.name)


def _rmsnorm(rec, a, c) -> Work:
    R, D = a["R"], a["D"]
    if rec.name == "rmsnorm.fwd":
        return Work(R * D * (_es(a["x_ptr"]) + _es(a["y_ptr"])) + D * _es(a["w_ptr"]) + 4 * R, R * D * 4, 0)
    per = _es(a["dy_ptr"]) + _es(a["x_ptr"]) + (_es(a["dx_ptr"]) if c["WRITE_DX"] else 0)
    part = rec.launch.grid[0] * D * 4 if c["WRITE_DW"] else 0
    return Work(R * D * per + 4 * R + D * _es(a["w_ptr"]) + part, R * D * (6 + 2 * c["WRITE_DW"]), 0)


def _tokens(rec, a, c) -> Work:
    k = rec.name.split(".")[1]
    sincos = c.get("POS_MODE") == 2
    if k == "add_pos_fwd":
        R, D = a["R"], a["D"]
        n_table = min(R, a["pos_ptr"].shape[0]) if not sincos else 0  # each table row read once (L2)
        b = R * D * (_es(a["x_ptr"]) + _es(a["out_ptr"])) + R * _es(a["idx_ptr"]) + n_table * D * _es(a["pos_ptr"])
        return Work(b, R * D * (ADD_POS_SINCOS_FLOPS if sincos else 1), R * D * SINCOS3D_INT_OPS if sincos else 0)
    if k == "scatter_fwd":
        R, N, D = a["R"], a["N"], a["D"]
        B, M = a["vis_ptr"].shape[0], a["vis_ptr"].shape[1]
        b = B * M * D * _es(a["vis_ptr"]) + R * 4 + D * _es(a["mt_ptr"]) + R * D * _es(a["out_ptr"])
        b += 0 if sincos else N * D * _es(a["pos_ptr"])
        return Work(b, R * D * (ADD_POS_SINCOS_FLOPS if sincos else 1), R * D * SINCOS3D_INT_OPS if sincos else 0)
    if k == "pos_grad":
        B, N, D = a["B"], a["N"], a["D"]
        M = a["g_ptr"].shape[1]  # visible tokens per clip: the rows g has
        return Work(B * M * D * _es(a["g_ptr"]) + B * N * 4 + N * D * _es(a["gpos_ptr"]), B * M * D, 0)
    if k == "scatter_bwd":
        B, N, M, D = a["B"], a["N"], a["M"], a["D"]
        b = B * N * D * _es(a["g_ptr"]) + B * N * 4
        b += B * M * D * _es(a["gvis_ptr"]) if c["WRITE_GVIS"] else 0
        b += N * D * _es(a["gpos_ptr"]) if c["WRITE_GPOS"] else 0
        b += rec.launch.grid[0] * D * 4 if c["WRITE_GMT"] else 0
        return Work(b, B * N * D * (c["WRITE_GPOS"] + c["WRITE_GMT"]), 0)
    raise KeyError(rec.name)


def _philox(rec, a, c) -> Work:
    M, C = a["M"], a["C"]
    padded = _pad(M, c["BLOCK_M"]) * _pad(C, c["BLOCK_C"])  # masked lanes still draw
    ints, fl = padded * PHILOX_INT_OPS, padded * BOX_MULLER_FLOPS
    k = rec.name.split(".")[1]
    if k == "q_sample":
        b = M * C * (_es(a["x_ptr"]) + _es(a["out_ptr"])) + M * (_es(a["t_ptr"]) + _es(a["seeds_ptr"]) + 2 * 8)
        return Work(b, fl + 3 * M * C, ints)
    if k == "eps_mse_fwd":
        return Work(M * C * _es(a["e_ptr"]) + M * (_es(a["seeds_ptr"]) + 4), fl + 3 * M * C, ints)
    if k == "eps_mse_bwd":
        b = M * C * (_es(a["e_ptr"]) + _es(a["grad_ptr"])) + M * (_es(a["seeds_ptr"]) + 4)
        return Work(b, fl + 2 * M * C, ints)
    raise KeyError(rec.name)


def _timestep(rec, a, c) -> Work:
    M, DIM = a["M"], c["DIM"]
    return Work(M * (_es(a["t_ptr"]) + DIM * 4) + c["HALF"] * 4, M * DIM * (SINCOS_FLOPS + 1), 0)


def work(rec) -> Work:
    """The essential work of one captured launch (see the module docstring)."""
    a, c = _named(rec)
    family = rec.name.split(".")[0]
    fn = {"adaln": _adaln, "rmsnorm": _rmsnorm, "token_gather": _tokens, "diffusion_noise": _philox,
          "timestep_embedding": _timestep}[family]
    return fn(rec, a, c)


def seconds(w: Work, dev: Device) -> dict:
    """Time of ``w`` at ``dev``'s peaks: memory, float32, integer, and the roofline (their max)."""
    t = {"memory": w.bytes / dev.hbm_bytes_s, "fp32": w.flops / dev.fp32_flops, "int32": w.int_ops / dev.int32_ops}
    limiter = max(t, key=t.get)
    return {**t, "roofline": t[limiter], "limiter": limiter}


def shape_of(rec) -> str:
    a, c = _named(rec)
    fam, _, k = rec.name.partition(".")
    if fam == "adaln":
        return f"{a['M']}x{a['N']}"
    if fam == "rmsnorm":
        return f"{a['R']}x{a['D']}"
    if fam == "diffusion_noise":
        return f"{a['M']}x{a['C']}"
    if fam == "timestep_embedding":
        return f"{a['M']}x{c['DIM']}"
    if k in ("add_pos_fwd",):
        return f"{a['R']}x{a['D']}" + (" sincos" if c["POS_MODE"] == 2 else "")
    if k == "pos_grad":
        return f"{a['B']}x{a['g_ptr'].shape[1]}->{a['N']}x{a['D']}"
    return f"{a['B'] if 'B' in a else a['R'] // a['N']}x{a['N']}x{a['D']}"


def _dtype(rec) -> str:
    for arg in rec.args:
        if isinstance(arg, launch.TensorArg) and arg.dtype.is_floating_point and arg.shape != (1,):
            return str(arg.dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32")
    return "-"


def step_rows(records_by_device: dict) -> list:
    """One row per (kernel, shape, dtype, flags) of a step: launches per step, work per launch and
    the roofline time per launch and per step on each device. ``records_by_device`` maps a device
    name to the step's captured launches planned for that device's SM count."""
    rows: dict = {}
    for dev in DEVICES:
        for rec in records_by_device[dev.name]:
            flags = tuple((k, v) for k, v in rec.launch.constexprs if not k.startswith("BLOCK"))
            key = (rec.name, shape_of(rec), _dtype(rec), flags)
            w = work(rec)
            t = seconds(w, dev)
            row = rows.setdefault(key, {"kernel": rec.name, "shape": key[1], "dtype": key[2],
                                        "flags": " ".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                                                          for k, v in flags), "launches": {}, "bytes": w.bytes,
                                        "flops": w.flops, "int_ops": w.int_ops, "us": {}, "limiter": {},
                                        "step_ms": {}})
            row["launches"][dev.name] = row["launches"].get(dev.name, 0) + 1
            row["us"][dev.name] = round(t["roofline"] * 1e6, 2)
            row["limiter"][dev.name] = t["limiter"]
            row["step_ms"][dev.name] = row["step_ms"].get(dev.name, 0.0) + t["roofline"] * 1e3
    out = list(rows.values())
    for r in out:
        r["launches"] = r["launches"][DEVICES[0].name]
        r["step_ms"] = {k: round(v, 4) for k, v in r["step_ms"].items()}
    out.sort(key=lambda r: -r["step_ms"][H100.name])
    return out


def totals(rows: list) -> dict:
    """Per device: the kernels' roofline time per step (ms) and the bytes they move (GB)."""
    return {dev.name: {"ms": round(sum(r["step_ms"][dev.name] for r in rows), 3),
                       "gb": round(sum(r["bytes"] * r["launches"] for r in rows) / 1e9, 3)} for dev in DEVICES}


def rows_markdown(rows: list, title: str) -> str:
    short = {A100.name: "A100", H100.name: "H100", H200.name: "H200"}
    lines = [f"### {title}", "",
             "| kernel | shape | dtype | flags | launches/step | MB/launch | MFLOP/launch | Mint/launch | "
             + " | ".join(f"{short[d.name]} µs/launch" for d in DEVICES) + " | bound (H100) | "
             + " | ".join(f"{short[d.name]} ms/step" for d in DEVICES) + " |",
             "|" + " --- |" * (9 + 2 * len(DEVICES))]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['shape']} | {r['dtype']} | {r['flags']} | {r['launches']} | "
            f"{r['bytes'] / 1e6:.2f} | {r['flops'] / 1e6:.1f} | {r['int_ops'] / 1e6:.1f} | "
            + " | ".join(f"{r['us'][d.name]:.1f}" for d in DEVICES) + f" | {r['limiter'][H100.name]} | "
            + " | ".join(f"{r['step_ms'][d.name]:.3f}" for d in DEVICES) + " |")
    tot = totals(rows)
    lines.append("| **all** | | | | " + str(sum(r["launches"] for r in rows)) + " | "
                 + f"{sum(r['bytes'] * r['launches'] for r in rows) / 1e6:.0f} (per step) | | | "
                 + " | " * (len(DEVICES) - 1) + " | | "
                 + " | ".join(f"**{tot[d.name]['ms']:.2f}**" for d in DEVICES) + " |")
    return "\n".join(lines)


def devices_text() -> str:
    return "\n".join(f"- {d.name}: {d.hbm_bytes_s / 1e12:.3g} TB/s, {d.bf16_flops / 1e12:.0f} TFLOP/s bf16 dense, "
                     f"{d.fp32_flops / 1e12:.1f} TFLOP/s fp32, {d.int32_ops / 1e12:.1f} Tops/s INT32 ({d.source})"
                     for d in DEVICES)


def kernel_table(launches: dict) -> dict:
    """The roofline of each config's bf16 step from ``compile_check``'s launches
    ({(config, mode, target name): records}); markdown and JSON."""
    configs = sorted({k[0] for k in launches})
    parts = ["## Roofline of the kernels at the paper shapes", "",
             "Essential bytes and work per launch (ivfast.ops.roofline: each tensor read or written once, "
             "FLOP/integer counts estimated per element), and the time that implies at each device's peak "
             "(the largest of memory, fp32 and INT32 time). Launches per step: the Stage-1 step in bf16 "
             "(forward + backward). Peaks:", "", devices_text(), ""]
    js = {"devices": [d.__dict__ for d in DEVICES], "configs": {}}
    for cfg in configs:
        by_dev = {d.name: launches[(cfg, "bf16", TARGET_OF[d.name].name)] for d in DEVICES}
        rows = step_rows(by_dev)
        parts += [rows_markdown(rows, f"{cfg} (bf16)"), ""]
        js["configs"][cfg] = {"rows": rows, "totals": totals(rows)}
    return {"markdown": "\n".join(parts), "json": js}
