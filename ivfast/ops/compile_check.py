"""Every Triton kernel of ivfast.ops compiled ahead of time for sm_80 and sm_90a, no GPU needed:
the machinery behind ``python -m ivfast.compile_check`` (which reads run configs into
:class:`StepShapes`; ivfast.ops does not read configs).

What is compiled: the launches the Stage-1 step makes at a :class:`StepShapes`, found by running
the real launchers (``ivfast.ops.launch.capture``) on ``meta`` tensors of those shapes, planned
for an A100 (108 SMs, sm_80) and an H100 (132 SMs, sm_90a): the same plan functions, tiles,
warps, grids and argument values (so the same JIT specialisation: i32/i64, ``== 1`` constants,
16-byte divisibility) a GPU launch gets. Modes (which dtypes reach each kernel, read off the
launchers' dispatch): ``bf16`` (bf16 training: DeepSpeed casts the model, everything bf16),
``bf16+fp32 head`` (``model.diffusion.precision: fp32``: q_sample, eps-MSE and the timestep
embedding in fp32; the adaLN kernels do not launch there, their bf16 parameters meet fp32
activations so the references run) and ``fp32`` (``train.precision: fp32``, also what CPU runs
launch). Each shape set also runs with the other position mode (``pos_learnable`` flipped: the
in-kernel sine-cosine formula of ``ivfast.ops.sincos`` or the learnable table).
:func:`step_launches` calls the ops as ``ivfast.models`` does; tests/ops/test_compile_check.py
checks its launches against the real Stage-1 model (on ``meta`` at the paper shapes, and a real
CPU forward + backward of the tiny step under the interpreter).

Per distinct compilation (kernel, specialisation, constexprs, num_warps, target): success,
registers, spill bytes, shared memory, PTX size, compile time (ptxas ``-v`` through Triton's own
compile) and occupancy (:func:`occupancy`, :data:`SM_LIMITS`). :func:`exit_code` is 1 on a
compile error, any spill, or a compile slower than ``max_compile_s`` (10 s). Results are cached
as JSON keyed by (triton version, the kernel's source hash with its callees, signature,
constexprs, attributes, options, target) in ``$IVFAST_CACHE_DIR/compile`` (default
``~/.cache/ivfast/compile``): a second run compiles nothing.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch

from ivfast.ops import adaln, diffusion_noise, dispatch, launch, rmsnorm, timestep_embedding, token_gather

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_COMPILE_S = 10.0
FREQ_DIM = 256  # ivfast.models.diffloss.TimestepEmbedder's frequency_embedding_size (no config key)


# =========================================================================== shapes
@dataclass(frozen=True)
class StepShapes:
    """What shapes the Stage-1 step's kernel launches (one config)."""

    name: str
    batch: int
    grid: tuple  # (t, h, w) tokens
    visible: int  # visible tokens per clip
    masked: int
    recon_rows: int  # masked tokens per clip the diffusion loss sees
    num_cls: int
    enc_width: int
    enc_depth: int
    release_blocks: bool  # RMSNorm blocks and patch-embed norms (else LayerNorm: no kernel)
    pos_learnable: bool
    patch_dim: int  # the target's channels C (3 x tubelet x patch^2)
    recon: str
    pred_width: int
    diff_width: int
    diff_depth: int
    learn_sigma: bool
    batch_mul: int
    num_timesteps: int
    head_precision: str
    chunk_rows: int  # effective: 0 under ZeRO-3
    fused: bool

    @property
    def tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def diffusion_rows(self) -> int:
        return self.batch * self.batch_mul * self.recon_rows


@dataclass(frozen=True)
class Mode:
    """The dtypes of a run: the model's (DeepSpeed casts it whole) and the head's precision."""

    name: str
    dtype: torch.dtype
    head_fp32: Optional[bool] = None  # None: as the config says


MODES = (Mode("bf16", torch.bfloat16), Mode("bf16+fp32 head", torch.bfloat16, True), Mode("fp32", torch.float32))


# =========================================================================== the step's launches
# The step's ops called as ivfast.models calls them, on meta tensors, each part once under
# launch.capture and its launches repeated as often as the model repeats it (a block per layer,
# a chunk per chunk of rows): the same launches, in another order, at a fraction of the cost.
def _t(*shape, dtype, grad=False):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


def _grad(outputs, inputs):
    """Backward of ``outputs`` (fresh contiguous gradients) into the ``inputs`` that need one."""
    outputs = [o for o in outputs if o.requires_grad]
    inputs = [i for i in inputs if i.requires_grad]
    if outputs and inputs:
        torch.autograd.grad(outputs, inputs, [torch.empty_like(o) for o in outputs], allow_unused=True)


def _captured(target: launch.Target, fn, *args) -> tuple:
    with dispatch.override(fused=True), launch.capture(target) as records:
        fn(*args)
    return tuple(records)


@functools.lru_cache(maxsize=None)
def _rmsnorm_launches(rows: int, d: int, dt, grad_x: bool, target) -> tuple:
    """RMSNorm over (rows, d), forward and backward (the input and its copies are contiguous)."""
    def go():
        x, w = _t(rows, d, dtype=dt, grad=grad_x), _t(d, dtype=dt, grad=True)
        _grad([rmsnorm.rmsnorm(x, w)], [x, w])
    return _captured(target, go)


@functools.lru_cache(maxsize=None)
def _add_pos_launches(b, v, n, ncls, d, grid, learnable, dt, target) -> tuple:
    """VideoEncoder.embed: the positions added at the visible tokens, then the CLS rows in front."""
    def go():
        idx = _t(b, v, dtype=torch.int64)
        x = _t(b, v, d, dtype=dt, grad=True)  # the patch embedding's output
        table = _t(ncls + n, d, dtype=dt, grad=learnable)  # PositionTable.table: CLS rows, then patches
        if learnable:
            out = token_gather.add_pos_at(x, idx, pos=table[ncls:])
        else:  # the fixed sine-cosine, computed in the kernel
            out = token_gather.add_pos_at(x, idx, grid=grid)
        _grad([torch.cat([_t(b, ncls, d, dtype=dt), out], dim=1)], [x, table])
    return _captured(target, go)


@functools.lru_cache(maxsize=None)
def _scatter_launches(b, v, n, ncls, d, learnable, dt, target) -> tuple:
    """predict_masked: encoder tokens at the visible positions, the mask token elsewhere, plus the
    predictor's position table; CLS rows in front."""
    def go():
        enc_tokens = _t(b, ncls + v, d, dtype=dt, grad=True)
        table = _t(ncls + n, d, dtype=dt, grad=learnable)
        mask_token = _t(d, dtype=dt, grad=True)
        seq = token_gather.scatter_with_mask_token(enc_tokens[:, ncls:], _t(b, v, dtype=torch.int64), mask_token,
                                                   table[ncls:])
        if ncls:
            seq = torch.cat([_t(b, ncls, d, dtype=dt), seq], dim=1)
        _grad([seq], [enc_tokens, mask_token, table])
    return _captured(target, go)


def _head_params(w: int, out_c: int, dt, blocks: int):
    p = lambda *shape: _t(*shape, dtype=dt, grad=True)  # noqa: E731 - in the model's dtype
    return ([(p(3 * w, w), p(3 * w), p(w), p(w), p(w, w), p(w), p(w, w), p(w)) for _ in range(blocks)],
            (p(2 * w, w), p(2 * w), p(out_c, w), p(out_c)))


@functools.lru_cache(maxsize=None)
def _head_chunk_launches(rows, c, w, learn_sigma, timesteps, dt, head_fp32, misalign, target) -> tuple:
    """DiffusionLoss._rows_loss on ``rows`` rows and its backward, one adaLN block (the model
    runs ``depth``: :func:`_adaln_block_launches`). ``misalign``: the chunk's byte offsets mod 16
    in (target, t, seeds)."""
    def go():
        out_c = 2 * c if learn_sigma else c
        _, final = _head_params(w, out_c, dt, 0)
        tgt = _t(rows + 16, c, dtype=dt).view(-1)[misalign[0] // dt.itemsize:][:rows * c].view(rows, c)
        t = _t(rows + 2, dtype=torch.int64)[misalign[1] // 8:][:rows]
        seeds = _t(rows + 2, dtype=torch.int64)[misalign[2] // 8:][:rows]
        if head_fp32:  # DiffusionLoss._compute: the rows in fp32, the parameters stay in the model's dtype
            tgt = tgt.float()
        hd = tgt.dtype
        table = torch.empty(timesteps, dtype=torch.float64, device="meta")
        diffusion_noise.q_sample(tgt, t, seeds, table, table)
        timestep_embedding.timestep_embedding(t, FREQ_DIM)
        h = _t(rows, w, dtype=hd, grad=True)  # the last block's output
        silu_y = _t(rows, w, dtype=hd, grad=True)
        out = adaln.adaln_final(h, silu_y, *final)
        mse = diffusion_noise.eps_mse(out[:, :c], seeds).mean()
        # the gradient reaching the output: the eps-MSE's and the VB term's (torch) summed
        loss = mse + (out[:, c:].float().sum() if learn_sigma else 0.0)
        _grad([loss], [h, silu_y, *final])
    return _captured(target, go)


@functools.lru_cache(maxsize=None)
def _adaln_block_launches(rows, w, dt, head_fp32, target) -> tuple:
    def go():
        (block,), _ = _head_params(w, 1, dt, 1)
        hd = torch.float32 if head_fp32 else dt
        h, silu_y = _t(rows, w, dtype=hd, grad=True), _t(rows, w, dtype=hd, grad=True)
        _grad([adaln.adaln_block(h, silu_y, *block)], [h, silu_y, *block])
    return _captured(target, go)


def _misalign(offset_elems: int, itemsize: int) -> int:
    return offset_elems * itemsize % 16


def step_launches(s: StepShapes, mode: Mode, target: launch.Target) -> list:
    """The :class:`ivfast.ops.launch.Captured` launches of one Stage-1 step (forward + backward)
    at ``s``'s shapes in ``mode``, planned for ``target``; nothing runs, no memory is used."""
    if not s.fused:
        return []
    dt = mode.dtype
    head_fp32 = (s.head_precision == "fp32") if mode.head_fp32 is None else mode.head_fp32
    b, v, n, d, ncls = s.batch, s.visible, s.tokens, s.enc_width, s.num_cls
    out: list = []
    if s.release_blocks:  # PatchEmbed's RMSNorms: the gathered patches (no grad) and their embedding
        out += _rmsnorm_launches(b * v, s.patch_dim, dt, False, target)
        out += _rmsnorm_launches(b * v, d, dt, True, target)
    out += _add_pos_launches(b, v, n, ncls, d, s.grid, s.pos_learnable, dt, target)
    if s.release_blocks:  # each Block: norm1, q_norm, k_norm (qkv views, made contiguous), norm2
        out += _rmsnorm_launches(b * (ncls + v), d, dt, True, target) * (4 * s.enc_depth)
    if s.recon != "none":
        out += _scatter_launches(b, v, n, ncls, d, s.pos_learnable, dt, target)
    if s.recon == "diffusion":
        m, c = s.diffusion_rows, s.patch_dim
        step = s.chunk_rows if s.chunk_rows > 0 else m  # ivfast.ops.chunked_loss: chunk by chunk
        for lo in range(0, m, step):
            rows = min(step, m - lo)
            misalign = (_misalign(lo * c, dt.itemsize), _misalign(lo, 8), _misalign(lo, 8))
            out += _head_chunk_launches(rows, c, s.diff_width, s.learn_sigma, s.num_timesteps, dt, head_fp32,
                                        misalign, target)
            out += _adaln_block_launches(rows, s.diff_width, dt, head_fp32, target) * s.diff_depth
    return out


# =========================================================================== occupancy
@dataclass(frozen=True)
class SMLimits:
    """Per-SM limits of a compute capability (CUDA C Programming Guide, "Compute Capabilities",
    Technical Specifications; CUDA Occupancy Calculator for the allocation granularities)."""

    name: str
    arch: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256  # registers, allocated per warp
    max_warps: int = 64  # 2048 threads
    max_blocks: int = 32
    smem_per_sm: int = 0  # bytes, the largest carveout
    smem_reserved_per_block: int = 1024  # the driver's reserved shared memory per block (sm_80+)


SM_LIMITS = {80: SMLimits("sm_80 (A100)", 80, smem_per_sm=164 * 1024),
             90: SMLimits("sm_90a (H100)", 90, smem_per_sm=228 * 1024)}


@dataclass(frozen=True)
class Occupancy:
    blocks: int  # resident blocks per SM
    warps: int  # resident warps per SM
    fraction: float  # warps / max_warps
    limiter: str  # "registers", "warps", "shared", "blocks"


def occupancy(regs: int, num_warps: int, smem_bytes: int, limits: SMLimits) -> Occupancy:
    """Resident blocks and warps per SM from registers/thread, warps/block and shared memory/block.

    Registers are allocated per warp in units of ``reg_alloc_unit``: a warp takes
    ``ceil(regs * 32 / 256) * 256`` of the SM's 64K; shared memory per block adds the 1 KB the
    driver reserves. The smallest of the four limits wins.
    """
    per_warp = -(-max(int(regs), 1) * 32 // limits.reg_alloc_unit) * limits.reg_alloc_unit
    by = {
        "registers": (limits.regs_per_sm // per_warp) // num_warps,
        "warps": limits.max_warps // num_warps,
        "shared": limits.smem_per_sm // (int(smem_bytes) + limits.smem_reserved_per_block),
        "blocks": limits.max_blocks,
    }
    limiter = min(by, key=lambda k: (by[k], list(by).index(k)))
    blocks = by[limiter]
    return Occupancy(blocks, blocks * num_warps, blocks * num_warps / limits.max_warps, limiter)


# =========================================================================== compile units
class _ArgTensor:
    """What the JIT's specialisation reads of a tensor argument: its dtype and address."""

    def __init__(self, arg: launch.TensorArg):
        self.dtype = arg.dtype
        self._ptr = 4096 + arg.misalign  # allocations are aligned; a view keeps its offset

    def data_ptr(self) -> int:
        return self._ptr


@dataclass
class Unit:
    """One distinct compilation: a kernel, its specialisation and a target."""

    name: str
    arch: int
    num_warps: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    kernel: object = field(repr=False, default=None)
    declared: tuple = ()  # the constexprs the plan sets (the JIT adds its own ``== 1`` ones)
    uses: list = field(default_factory=list)  # {config, mode, launches per step, dtype, grid}

    @property
    def key(self) -> str:
        import triton

        text = json.dumps([triton.__version__, self.kernel.cache_key, self.arch, self.signature,
                           _jsonable(self.constexprs), _jsonable(self.attrs), _jsonable(self.options)],
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def tiles(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.constexprs.items() if k.startswith("BLOCK"))

    def flags(self) -> str:
        return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items()
                        if not k.startswith("BLOCK") and k in self.declared)


def _jsonable(d: dict) -> list:
    return sorted([str(k), str(v)] for k, v in d.items())


_binders: dict = {}


def specialise(rec: launch.Captured, arch: int) -> tuple:
    """(signature, constexprs, attrs, options) of ``rec`` as the JIT computes them for ``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = rec.kernel
    key = (id(kernel), arch)
    if key not in _binders:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        _binders[key] = (backend, create_function_from_signature(kernel.signature, kernel.params, backend))
    backend, binder = _binders[key]
    args = [_ArgTensor(a) if isinstance(a, launch.TensorArg) else a for a in rec.args]
    kwargs = rec.launch.options()
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    names = list(kernel.arg_names)
    constexprs = {names[k[0]]: v for k, v in constexprs.items()}
    attrs = {names[k[0]]: v for k, v in attrs.items() if v}
    return signature, constexprs, attrs, dict(options.__dict__)


def collect_units(shapes: list, modes=MODES, archs=(80, 90), variants=True) -> tuple[list, dict]:
    """Distinct compilations of every launch of ``shapes`` (:class:`StepShapes`, one per config)
    x ``modes`` (+ the other position mode) x ``archs``, each with its uses; and the launches per
    (shapes name, mode, target name)."""
    units: dict = {}
    launches: dict = {}
    for base in shapes:
        shape_sets = [base]
        if variants:
            shape_sets.append(replace(base, name=base.name + " [pos fixed]", pos_learnable=not base.pos_learnable))
        for shapes in shape_sets:
            for mode in modes:
                for arch in archs:
                    target = next(t for t in launch.GPU_TARGETS if t.arch == arch)
                    recs = step_launches(shapes, mode, target)
                    launches[(shapes.name, mode.name, target.name)] = recs
                    counts: dict = {}
                    for rec in recs:
                        counts.setdefault(rec.key(), [rec, 0])[1] += 1
                    for rec, count in counts.values():
                        sig, const, attrs, options = specialise(rec, arch)
                        ukey = (rec.name, arch, json.dumps(sig), json.dumps(_jsonable(const)),
                                json.dumps(_jsonable(attrs)), options["num_warps"])
                        if ukey not in units:
                            units[ukey] = Unit(rec.name, arch, options["num_warps"], sig, const, attrs, options,
                                               kernel=rec.kernel,
                                               declared=tuple(n for n, _ in rec.launch.constexprs))
                        units[ukey].uses.append({"config": shapes.name, "mode": mode.name, "launches": count,
                                                 "dtype": _dtype_of(sig), "grid": list(rec.launch.grid)})
    return list(units.values()), launches


def _dtype_of(signature: dict) -> str:
    """The unit's activation dtype: the first bf16/fp16/fp32 pointer of its signature."""
    for v in signature.values():
        if v in ("*bf16", "*fp16", "*fp32"):
            return v[1:]
    return "-"


# =========================================================================== compiling
_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict:
    """Registers, spill bytes, stack frame and static shared memory from a ``ptxas -v`` log."""
    frame = _PTXAS.search(log)
    regs = _REGS.search(log)
    smem = _SMEM.search(log)
    return {"registers": int(regs.group(1)) if regs else None,
            "stack_bytes": int(frame.group(1)) if frame else None,
            "spill_store_bytes": int(frame.group(2)) if frame else None,
            "spill_load_bytes": int(frame.group(3)) if frame else None,
            "static_smem_bytes": int(smem.group(1)) if smem else 0}


def compile_unit(unit: Unit) -> dict:
    """Compile ``unit`` with Triton (its own ptxas, ``-v`` log captured); the report fields."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", unit.arch, 32)
    names = list(unit.kernel.arg_names)
    constexprs = {(names.index(k),): v for k, v in unit.constexprs.items()}
    attrs = {(names.index(k),): v for k, v in unit.attrs.items()}
    for i in range(len(names)):
        attrs.setdefault((i,), [])
    src = ASTSource(unit.kernel, unit.signature, constexprs, attrs)
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(buf):
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True
            compiled = triton.compile(src, target=target, options=unit.options)
    except Exception as e:  # noqa: BLE001 - a compile error is a result
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}" if str(e) else
                type(e).__name__, "compile_s": round(time.perf_counter() - t0, 3)}
    seconds = time.perf_counter() - t0
    out = {"ok": True, "error": None, "compile_s": round(seconds, 3), "ptx_bytes": len(compiled.asm["ptx"]),
           "cubin_bytes": len(compiled.asm["cubin"]), "dynamic_smem_bytes": int(compiled.metadata.shared)}
    out.update(parse_ptxas(buf.getvalue()))
    if out["registers"] is None:
        out.update(ok=False, error="no ptxas -v report in the compile log")
    return out


_WORK: list = []


def _compile_index(i: int) -> tuple:
    return i, compile_unit(_WORK[i])


def cache_dir() -> str:
    root = os.environ.get("IVFAST_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ivfast")
    return os.path.join(root, "compile")


def compile_all(units: list, jobs: int = 2, cache: Optional[str] = None, log=print) -> list:
    """Compile results for ``units`` (cached ones read back; the rest compiled, ``jobs`` processes)."""
    results: list = [None] * len(units)
    todo = []
    for i, u in enumerate(units):
        path = os.path.join(cache, u.key + ".json") if cache else None
        if path and os.path.isfile(path):
            with open(path) as f:
                results[i] = dict(json.load(f), cached=True)
        else:
            todo.append(i)
    if todo:
        log(f"compiling {len(todo)} of {len(units)} kernel builds ({len(units) - len(todo)} cached), "
            f"{jobs} process{'es' if jobs > 1 else ''}")
    triton_cache = tempfile.mkdtemp(prefix="ivfast-triton-")
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = triton_cache  # Triton writes its artifacts here; we keep our own cache
    try:
        global _WORK
        _WORK = units
        todo.sort(key=lambda i: -units[i].num_warps)
        if jobs > 1 and len(todo) > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(min(jobs, len(todo))) as pool:
                done = list(pool.imap_unordered(_compile_index, todo))
        else:
            done = [_compile_index(i) for i in todo]
    finally:
        _WORK = []
        shutil.rmtree(triton_cache, ignore_errors=True)
        if old is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = old
    for i, res in done:
        results[i] = dict(res, cached=False)
        if cache and res.get("ok"):
            try:
                os.makedirs(cache, exist_ok=True)
                tmp = os.path.join(cache, f".{units[i].key}.{os.getpid()}.tmp")
                with open(tmp, "w") as f:
                    json.dump(res, f)
                os.replace(tmp, os.path.join(cache, units[i].key + ".json"))
            except OSError as e:  # a read-only home: the results stand, uncached
                log(f"compile cache not written ({cache}: {e})")
                cache = None
    return results


# =========================================================================== report
def build_rows(units: list, results: list, max_compile_s: float = MAX_COMPILE_S) -> list:
    rows = []
    for u, r in zip(units, results):
        row = {"kernel": u.name, "arch": u.arch, "target": SM_LIMITS[u.arch].name, "num_warps": u.num_warps,
               "tiles": u.tiles(), "flags": u.flags(), "dtype": _dtype_of(u.signature),
               # name:type, "/16" where the JIT specialises on 16-divisibility; "=v" for the constexprs
               "signature": " ".join(f"{k}:{v}{'/16' if k in u.attrs else ''}" if v != "constexpr"
                                     else f"{k}={u.constexprs.get(k)}" for k, v in u.signature.items()),
               "uses": [f"{x['config']} | {x['mode']} | {x['launches']} per step | grid {x['grid']}"
                        for x in u.uses], **r}
        problems = []
        if not r.get("ok"):
            problems.append(f"compile error: {r.get('error')}")
        else:
            if r["spill_store_bytes"] or r["spill_load_bytes"]:
                problems.append(f"spills {r['spill_store_bytes']} B stores / {r['spill_load_bytes']} B loads")
            if r["compile_s"] > max_compile_s:
                problems.append(f"compile {r['compile_s']:.1f} s > {max_compile_s:g} s")
            smem = r["dynamic_smem_bytes"] + r["static_smem_bytes"]
            occ = occupancy(r["registers"], u.num_warps, smem, SM_LIMITS[u.arch])
            row.update(smem_bytes=smem, occupancy_warps=occ.warps, occupancy_blocks=occ.blocks,
                       occupancy=round(occ.fraction, 4), occupancy_limiter=occ.limiter)
        row["problems"] = problems
        rows.append(row)
    rows.sort(key=lambda r: (r["kernel"], r["dtype"], r["arch"], r["tiles"], r["flags"]))
    return rows


def exit_code(rows: list) -> int:
    """1 when any build has a problem (compile error, spill, compile slower than the limit), else 0."""
    return 1 if any(r["problems"] for r in rows) else 0


def _configs_of(row) -> str:
    seen = []
    for use in row["uses"]:
        c = use.split(" | ")[0].replace("stage1_", "").replace("_diffusion", "")
        if c not in seen:
            seen.append(c)
    return ", ".join(seen)


def table(rows: list) -> str:
    head = ("| kernel | dtype | target | tiles | flags | warps | regs | spill B | smem B | PTX KB | compile s | "
            "warps/SM (occ.) | configs |")
    lines = [head, "|" + " --- |" * 13]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"| {r['kernel']} | {r['dtype']} | sm_{r['arch']} | {r['tiles']} | {r['flags']} | "
                         f"{r['num_warps']} | FAILED: {r.get('error')} | | | | | | {_configs_of(r)} |")
            continue
        spill = r["spill_store_bytes"] + r["spill_load_bytes"]
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | sm_{r['arch']}{'a' if r['arch'] == 90 else ''} | {r['tiles']} | "
            f"{r['flags']} | {r['num_warps']} | {r['registers']} | {spill} | {r['smem_bytes']} | "
            f"{r['ptx_bytes'] / 1024:.0f} | {r['compile_s']:.2f}{'*' if r.get('cached') else ''} | "
            f"{r['occupancy_warps']} ({100 * r['occupancy']:.0f}%, {r['occupancy_limiter']}) | {_configs_of(r)} |")
    return "\n".join(lines)


def summary(rows: list) -> dict:
    ok = [r for r in rows if r.get("ok")]
    out = {"builds": len(rows), "failed": len(rows) - len(ok),
           "with_problems": sum(1 for r in rows if r["problems"]),
           "kernels": len({r["kernel"] for r in rows})}
    if ok:
        worst = max(ok, key=lambda r: r["registers"])
        slow = max(ok, key=lambda r: r["compile_s"])
        low = min(ok, key=lambda r: (r["occupancy"], -r["registers"]))
        out.update(
            max_registers={"registers": worst["registers"], "kernel": worst["kernel"], "dtype": worst["dtype"],
                           "arch": worst["arch"], "tiles": worst["tiles"]},
            total_spill_bytes=sum(r["spill_store_bytes"] + r["spill_load_bytes"] for r in ok),
            slowest_compile={"seconds": slow["compile_s"], "kernel": slow["kernel"], "arch": slow["arch"]},
            lowest_occupancy={"warps": low["occupancy_warps"], "fraction": low["occupancy"],
                              "limiter": low["occupancy_limiter"], "kernel": low["kernel"], "dtype": low["dtype"],
                              "arch": low["arch"], "registers": low["registers"], "num_warps": low["num_warps"]},
            compile_seconds_total=round(sum(r["compile_s"] for r in ok), 1))
    return out


def limits_text() -> str:
    lines = ["SM limits used for occupancy (CUDA C Programming Guide, Compute Capabilities table; occupancy "
             "calculator granularities):"]
    for lim in SM_LIMITS.values():
        lines.append(f"- {lim.name}: {lim.regs_per_sm // 1024}K 32-bit registers per SM (at most "
                     f"{lim.max_regs_per_thread} per thread, allocated per warp in units of {lim.reg_alloc_unit}), "
                     f"{lim.max_warps} warps ({32 * lim.max_warps} threads) and {lim.max_blocks} blocks per SM, "
                     f"{lim.smem_per_sm // 1024} KB shared memory per SM (largest carveout), "
                     f"{lim.smem_reserved_per_block} B reserved per block")
    return "\n".join(lines)


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001 - no git: unknown
        return ""


STEP_BEGIN, STEP_END = "<!-- step-bound:begin -->", "<!-- step-bound:end -->"


def write_results(report: dict, markdown: str, out_dir: str, date: str) -> tuple[str, str]:
    """``compile-<date>.{md,json}``; a step-bound section already there (benchmarks/roofline.py) stays."""
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, f"compile-{date}.md")
    js_path = os.path.join(out_dir, f"compile-{date}.json")
    if os.path.isfile(md_path):
        with open(md_path) as f:
            old = f.read()
        if STEP_BEGIN in old and STEP_END in old:
            kept = old[old.index(STEP_BEGIN):old.index(STEP_END) + len(STEP_END)]
            markdown = markdown.replace(f"{STEP_BEGIN}\n{STEP_END}", kept)
    if os.path.isfile(js_path):
        with open(js_path) as f:
            old_js = json.load(f)
        if "step_bound" in old_js:
            report = dict(report, step_bound=old_js["step_bound"])
    with open(md_path, "w") as f:
        f.write(markdown)
    dump_json(report, js_path)
    return md_path, js_path


def dump_json(report: dict, path: str) -> None:
    """Indented, with each row of ``rows`` on one line (a diff shows which builds changed)."""
    rows = report.get("rows", [])
    body = json.dumps({k: ("@ROWS@" if k == "rows" else v) for k, v in report.items()}, indent=1, default=str)
    lines = ",\n".join("  " + json.dumps(r, default=str) for r in rows)
    with open(path, "w") as f:
        f.write(body.replace('"@ROWS@"', "[\n" + lines + "\n ]") + "\n")


def run(shapes: list, *, jobs: int = 2, cache: Optional[str] = None, archs=(80, 90),
        max_compile_s: float = MAX_COMPILE_S, kernels: Optional[str] = None, log=print) -> dict:
    """Derive the launches of ``shapes`` (:class:`StepShapes`), compile them (cached) and report;
    the report as a dict (``rows``, ``summary``, ...)."""
    import triton

    t0 = time.perf_counter()
    units, launches = collect_units(shapes, archs=archs)
    if kernels:
        units = [u for u in units if kernels in u.name]
    derive_s = time.perf_counter() - t0
    results = compile_all(units, jobs=jobs, cache=cache, log=log)
    rows = build_rows(units, results, max_compile_s)
    return {
        "date": datetime.date.today().isoformat(), "commit": _git("rev-parse", "HEAD"),
        "working_tree_modified": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "triton": triton.__version__, "torch": torch.__version__.split("+")[0], "python": sys.version.split()[0],
        "targets": {a: SM_LIMITS[a].name for a in archs}, "modes": [m.name for m in MODES],
        "configs": [x.name for x in shapes], "shapes": {x.name: asdict(x) for x in shapes},
        "sm_limits": {a: asdict(SM_LIMITS[a]) for a in archs},
        "max_compile_s": max_compile_s, "derive_s": round(derive_s, 2),
        "wall_s": round(time.perf_counter() - t0, 2), "rows": rows, "summary": summary(rows),
        "_launches": launches,
    }


def markdown(report: dict, roofline_md: str = "") -> str:
    s = report["summary"]
    lines = [
        f"# Kernels compiled ahead of time ({report['date']})", "",
        f"`python -m ivfast.compile_check --write` at commit `{report['commit'][:12]}`"
        f"{' (working tree modified)' if report['working_tree_modified'] else ''}: triton {report['triton']}, "
        f"torch {report['torch']}, no GPU (Triton's bundled ptxas). Device-independent: the same on any machine "
        "with these versions.", "",
        "Every launch of the Stage-1 step (forward + backward) at the configs "
        f"{', '.join('`' + c + '`' for c in report['configs'])} (each also with `pos_learnable` flipped: "
        "\"[pos fixed]\"), in the modes " + ", ".join(f"`{m}`" for m in report["modes"]) + ", planned by the "
        "launchers' own plan functions for an A100 (108 SMs) and an H100 (132 SMs), compiled for sm_80 and "
        "sm_90a. One row per distinct build (kernel, JIT specialisation, constexprs, warps, target); "
        "`configs` lists where it launches.", "",
        f"Summary: {s['builds']} builds of {s['kernels']} kernels, {s['failed']} failed, "
        f"{s['with_problems']} with a problem (spill, compile error, compile > {report['max_compile_s']:g} s).",
    ]
    if "max_registers" in s:
        mr, sc, lo = s["max_registers"], s["slowest_compile"], s["lowest_occupancy"]
        lines += [
            f"- most registers: {mr['registers']} ({mr['kernel']}, {mr['dtype']}, sm_{mr['arch']}, {mr['tiles']})",
            f"- spill bytes, all builds: {s['total_spill_bytes']}",
            f"- slowest compile: {sc['seconds']:.2f} s ({sc['kernel']}, sm_{sc['arch']}); all builds "
            f"{s['compile_seconds_total']} s of compile on one core",
            f"- lowest occupancy: {lo['warps']} warps/SM ({100 * lo['fraction']:.1f}%, limited by {lo['limiter']}: "
            f"{lo['kernel']}, {lo['dtype']}, sm_{lo['arch']}, {lo['registers']} registers x {lo['num_warps']} warps)",
        ]
    lines += ["", limits_text(), "",
              "Columns: `regs` registers per thread and `spill B` spill stores + loads (ptxas -v); `smem B` "
              "the shared memory a block asks for (Triton's + static); `compile s` the cold compile "
              "(* read from the cache, measured when first compiled); `warps/SM` resident warps per SM "
              "from registers, warps and shared memory, the limiter named.", "",
              table(report["rows"]), ""]
    if roofline_md:
        lines += [roofline_md, ""]
    lines += ["## Step lower bound", "", STEP_BEGIN, STEP_END, ""]
    return "\n".join(lines)
