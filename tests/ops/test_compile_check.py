"""ivfast.ops.compile_check (with its CLI, ivfast.compile_check) and ivfast.ops.roofline: the
launches the tool compiles are the ones the
real launchers make (same plan functions, same shapes as the model), the kernels build for
sm_80 and sm_90a with Triton's ptxas, the exit logic catches spills and slow compiles, the
occupancy and roofline arithmetic match hand-computed values."""
import collections
import json

import pytest
import torch
import triton
import triton.language as tl

from ivfast.ops import adaln, diffusion_noise, dispatch, launch, rmsnorm, roofline, timestep_embedding, token_gather
from ivfast.compile_check import config_shapes
from ivfast.ops import compile_check as CC
from tests.ops.common import compiled_python, needs_ptxas

PAPER = ("stage1_b_diffusion", "stage1_l_diffusion")


# ----------------------------------------------------------------------------- shapes from the configs
@pytest.mark.parametrize("overrides", [(), ("model.mask_ratio=0.6", "model.diffusion.reconstruction_ratio=0.3",
                                        "model.diffusion.batch_mul=2")])
def test_step_shapes_are_what_prepare_draws(overrides):
    """The tool's token and row counts are those of the inputs Stage1Step.prepare really draws."""
    from ivfast.compile_check import step_shapes
    from ivfast.config import load_config
    from ivfast.rng import SampleRNG
    from ivfast.training.step import Stage1Step

    cfg = load_config("tiny", list(overrides))
    s, d = step_shapes(cfg, "tiny"), cfg.data
    step = Stage1Step(cfg)
    step.to(torch.device("cpu"), torch.float32)
    inputs = step.prepare(torch.randn(d.batch_size, 3, d.num_frames, d.img_size, d.img_size),
                          SampleRNG.for_step(0, 1, list(range(d.batch_size))))
    assert inputs.visible_idx.shape == (s.batch, s.visible)
    assert inputs.recon_idx.shape == (s.batch, s.recon_rows) and s.visible + s.masked == s.tokens
    assert inputs.diffusion_t.shape == (s.diffusion_rows,)


def test_step_shapes_follow_zero3_and_overrides():
    """Under ZeRO-3 the head runs unchunked (chunk 0); overrides reach the shapes."""
    from ivfast.compile_check import step_shapes
    from ivfast.config import load_config

    cfg = load_config("stage1_b_diffusion", ["deepspeed.zero_stage=3", "model.mask_ratio=0.5",
                                             "model.diffusion.reconstruction_ratio=0.25"])
    s = step_shapes(cfg, "z3")
    assert (s.chunk_rows, s.visible, s.masked, s.recon_rows) == (0, 16 * 128, 16 * 128, 512)


def test_paper_shapes():
    """ViT-B: 16 clips x 16 frames of 16 x 16 tokens, 52 visible per frame (832 per clip), the
    diffusion head over the 52,224 masked tokens in chunks of 8192 rows, 588 channels."""
    s = config_shapes("stage1_b_diffusion")
    assert (s.batch, s.grid, s.visible, s.masked, s.patch_dim) == (16, (16, 16, 16), 832, 3264, 588)
    assert (s.diffusion_rows, s.diff_width, s.chunk_rows, s.enc_width) == (52224, 1536, 8192, 768)
    assert config_shapes("stage1_l_diffusion").enc_width == 1024


def test_occupancy_by_hand():
    """Resident warps per SM, worked by hand from the SM limits."""
    sm80, sm90 = CC.SM_LIMITS[80], CC.SM_LIMITS[90]
    # 225 regs: ceil(225*32/256) = 29 units = 7424 per warp; 65536 // 7424 = 8 warps = 2 blocks of 4
    assert CC.occupancy(225, 4, 4096, sm90) == CC.Occupancy(2, 8, 0.125, "registers")
    # 64 regs: 2048 per warp -> 32 warps -> 8 blocks of 4
    assert CC.occupancy(64, 4, 0, sm80) == CC.Occupancy(8, 32, 0.5, "registers")
    # 32 regs, 8 warps: registers allow 64 warps, so does the warp limit: 8 blocks, all 64 warps
    assert CC.occupancy(32, 8, 0, sm90).warps == 64
    # shared memory: 100 KB + 1 KB reserved per block; 164 KB on sm_80 -> 1 block, 228 KB on sm_90 -> 2
    assert CC.occupancy(32, 4, 100 * 1024, sm80) == CC.Occupancy(1, 4, 4 / 64, "shared")
    assert CC.occupancy(32, 4, 100 * 1024, sm90) == CC.Occupancy(2, 8, 8 / 64, "shared")
    # 1-warp blocks of 16 registers: 32 blocks per SM at most
    assert CC.occupancy(16, 1, 0, sm80) == CC.Occupancy(32, 32, 0.5, "blocks")
    # 255 registers: 32 units = 8192 per warp -> 8 warps
    assert CC.occupancy(255, 1, 0, sm80).warps == 8


def _row(problems_in: dict) -> dict:
    base = {"ok": True, "error": None, "compile_s": 0.5, "ptx_bytes": 1000, "cubin_bytes": 1000,
            "dynamic_smem_bytes": 0, "static_smem_bytes": 0, "registers": 40, "stack_bytes": 0,
            "spill_store_bytes": 0, "spill_load_bytes": 0}
    return dict(base, **problems_in)


def test_exit_logic_on_mocked_reports():
    """A spill, a compile over the limit or a compile error make the exit code 1; clean builds 0."""
    unit = CC.Unit("test.kernel", 90, 4, {"x": "*fp32"}, {"BLOCK": 128}, {}, {"num_warps": 4})
    cases = {"clean": _row({}), "spill": _row({"spill_store_bytes": 8}), "spill_load": _row({"spill_load_bytes": 4}),
             "slow": _row({"compile_s": 10.5}), "error": {"ok": False, "error": "PTXASError: boom", "compile_s": 1.0}}
    for name, result in cases.items():
        rows = CC.build_rows([unit], [result], max_compile_s=10.0)
        assert CC.exit_code(rows) == (0 if name == "clean" else 1), name
        assert bool(rows[0]["problems"]) == (name != "clean")
    assert CC.exit_code(CC.build_rows([unit], [_row({"compile_s": 12.0})], max_compile_s=20.0)) == 0


def test_ptxas_log_parsing():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    1872 bytes stack frame, 3156 bytes spill stores, 4248 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 1 barriers, 1024 bytes smem\n")
    assert CC.parse_ptxas(log) == {"registers": 168, "stack_bytes": 1872, "spill_store_bytes": 3156,
                                   "spill_load_bytes": 4248, "static_smem_bytes": 1024}


# ----------------------------------------------------------------------------- the launches
def _keys(records) -> collections.Counter:
    return collections.Counter(r.key() for r in records)


def test_plans_come_from_the_plan_functions():
    """Every launch the tool derives carries the plan its kernel's plan function returns for the
    launch's shape, dtype, flags and target (the function the launchers call)."""
    plan_fns = {
        "adaln.ln_mod_fwd": lambda a, f, t: adaln.ln_mod_fwd_config(a["M"], a["N"], a["X"].dtype, t,
                                                                     affine=f["HAS_AFFINE"], save_stats=f["SAVE_STATS"]),
        "adaln.ln_mod_bwd": lambda a, f, t: adaln.ln_mod_bwd_config(
            a["M"], a["N"], a["X"].dtype, t, affine=f["HAS_AFFINE"], dres=f["HAS_DRES"], dshift=f["WRITE_DSHIFT"],
            recompute=f["RECOMPUTE"], colsum=f["COLSUM"]),
        "adaln.bias_silu_fwd": lambda a, f, t: adaln.bias_silu_fwd_config(a["M"], a["N"], a["A"].dtype, t,
                                                                           has_bias=f["HAS_BIAS"]),
        "adaln.bias_silu_bwd": lambda a, f, t: adaln.bias_silu_bwd_config(a["M"], a["N"], a["A"].dtype, t,
                                                                           has_bias=f["HAS_BIAS"],
                                                                           recompute=f["RECOMPUTE"]),
        "adaln.gated_fwd": lambda a, f, t: adaln.gated_fwd_config(a["M"], a["N"], a["X"].dtype, t),
        "adaln.gated_bwd": lambda a, f, t: adaln.gated_bwd_config(a["M"], a["N"], a["DOUT"].dtype, t,
                                                                   colsum=f["COLSUM"]),
        "rmsnorm.fwd": lambda a, f, t: rmsnorm.rms_fwd_config(a["R"], a["D"], a["x_ptr"].dtype, t),
        "rmsnorm.bwd": lambda a, f, t: rmsnorm.rms_bwd_config(a["R"], a["D"], a["x_ptr"].dtype, t,
                                                              want_x=f["WRITE_DX"], want_w=f["WRITE_DW"]),
        "token_gather.add_pos_fwd": lambda a, f, t: token_gather.add_pos_fwd_config(
            a["R"], a["D"], a["x_ptr"].dtype, t, pos_mode=f["POS_MODE"]),
        "token_gather.pos_grad": lambda a, f, t: token_gather.pos_grad_config(a["N"], a["D"], a["g_ptr"].dtype, t),
        "token_gather.scatter_fwd": lambda a, f, t: token_gather.scatter_fwd_config(
            a["R"], a["D"], a["vis_ptr"].dtype, t, pos_mode=f["POS_MODE"]),
        "token_gather.scatter_bwd": lambda a, f, t: token_gather.scatter_bwd_config(
            a["N"], a["D"], a["g_ptr"].dtype, t, gvis=f["WRITE_GVIS"], gpos=f["WRITE_GPOS"], gmt=f["WRITE_GMT"]),
        "diffusion_noise.q_sample": lambda a, f, t: diffusion_noise.philox_config(a["M"], a["C"], a["x_ptr"].dtype, t),
        "diffusion_noise.eps_mse_fwd": lambda a, f, t: diffusion_noise.philox_config(a["M"], a["C"],
                                                                                     a["e_ptr"].dtype, t),
        "diffusion_noise.eps_mse_bwd": lambda a, f, t: diffusion_noise.philox_config(a["M"], a["C"],
                                                                                     a["e_ptr"].dtype, t),
        "timestep_embedding": lambda a, f, t: timestep_embedding.timestep_config(a["M"], f["DIM"], t),
    }
    seen = set()
    for name in PAPER + ("tiny",):
        s = config_shapes(name)
        for shapes in (s, CC.replace(s, pos_learnable=not s.pos_learnable)):
            for target in launch.GPU_TARGETS:
                for rec in CC.step_launches(shapes, CC.MODES[0], target):
                    a, f = dict(zip(rec.arg_names, rec.args)), dict(rec.launch.constexprs)
                    assert plan_fns[rec.name](a, f, target) == rec.launch, rec.name
                    seen.add(rec.name)
    assert seen == set(plan_fns)


@pytest.mark.parametrize("name", PAPER + ("tiny",))
def test_launches_are_the_real_models(name):
    """At the paper shapes (and tiny), the tool's launches are those of the real Stage-1 model's
    forward + backward on ``meta`` (benchmarks.roofline.model_launches): the same kernels, plans,
    argument values, dtypes and strides, as often; in every mode."""
    from benchmarks.roofline import model_launches

    s = config_shapes(name)
    modes = CC.MODES if name != "stage1_l_diffusion" else CC.MODES[:2]
    for mode in modes:
        real = model_launches(name, mode, launch.H100)
        assert real and _keys(real) == _keys(CC.step_launches(s, mode, launch.H100)), mode.name


def test_launches_of_a_real_tiny_step():
    """A real CPU forward + backward of the tiny Stage-1 step with the fused kernels (the
    interpreter) launches exactly what the tool derives for tiny at the interpreter's target."""
    from ivfast.config import load_config
    from ivfast.rng import SampleRNG
    from ivfast.training.step import Stage1Step

    if not dispatch.interpreting():
        pytest.skip("the interpreter's tiles: CPU tensors under TRITON_INTERPRET=1")
    cfg = load_config("tiny")
    torch.manual_seed(0)
    step = Stage1Step(cfg)
    step.to(torch.device("cpu"), torch.float32)
    d = cfg.data
    video = torch.randn(d.batch_size, 3, d.num_frames, d.img_size, d.img_size)
    rng = SampleRNG.for_step(0, 1, list(range(d.batch_size)))
    with dispatch.override(fused=True), launch.capture(launch=True) as real:
        out = step.model(*step.prepare(video, rng))
        out["loss"].backward()
    assert torch.isfinite(out["loss"])
    mine = CC.step_launches(config_shapes("tiny"), CC.MODES[2], launch.INTERPRETER)
    assert len(real) == len(mine) == 58 and _keys(real) == _keys(mine)


def test_capture_on_meta_records_and_runs_nothing():
    with launch.capture(launch.A100) as recs:
        x = torch.empty(52224, 588, dtype=torch.bfloat16, device="meta")
        seeds = torch.empty(52224, dtype=torch.int64, device="meta")
        diffusion_noise.eps_mse(x, seeds)
    (rec,) = recs
    assert rec.name == "diffusion_noise.eps_mse_fwd"
    assert rec.launch == launch.Launch.of((13056,), 4, BLOCK_M=4, BLOCK_C=128)
    assert rec.args[0] == launch.TensorArg(torch.bfloat16, (52224, 588), (588, 1), 0)
    assert not dispatch.use_triton(x)  # the meta switch is off again


# ----------------------------------------------------------------------------- the roofline
def test_roofline_bytes_by_hand():
    """gated_fwd over a ViT-B head chunk (8192 x 1536 bf16): x, gate, h read, out written, 2 bytes
    each: 8 x 8192 x 1536 bytes, 30.0 us at 3.35 TB/s; q_sample draws on its 4 x 128 tiles (640
    padded columns of 588)."""
    s = config_shapes("stage1_b_diffusion")
    recs = CC.step_launches(s, CC.MODES[0], launch.H100)
    gated = next(r for r in recs if r.name == "adaln.gated_fwd" and r.args[4] == 8192)
    w = roofline.work(gated)
    assert w.bytes == 8 * 8192 * 1536 == 100_663_296
    t = roofline.seconds(w, roofline.H100)
    assert t["limiter"] == "memory" and t["roofline"] == pytest.approx(100_663_296 / 3.35e12)
    assert roofline.seconds(w, roofline.A100)["roofline"] == pytest.approx(100_663_296 / 2.039e12)
    qs = next(r for r in recs if r.name == "diffusion_noise.q_sample" and r.args[6] == 8192)
    wq = roofline.work(qs)
    assert wq.bytes == 8192 * 588 * (2 + 2) + 8192 * (8 + 8 + 16)
    assert wq.int_ops == 8192 * 640 * roofline.PHILOX_INT_OPS
    rms = next(r for r in recs if r.name == "rmsnorm.fwd" and r.args[5] == 768 and r.args[4] == 16 * 836)
    assert roofline.work(rms).bytes == 16 * 836 * 768 * (2 + 2) + 768 * 2 + 4 * 16 * 836


# ----------------------------------------------------------------------------- compiled for sm_80 and sm_90a
@triton.jit
def _spilling_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """A deliberately huge tile: 16K float32 per program on one warp, live across two reductions."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    s = tl.sum(x * x, axis=0)
    m = tl.max(x, axis=0)
    tl.store(out_ptr + offs, (x - m) * s, mask=offs < n)


_SPILL = r"""
import json, torch
from ivfast.ops import compile_check as CC, launch
from tests.ops.test_compile_check import _spilling_kernel as k
t = launch.TensorArg(torch.float32, (16384,), (1,), 0)
rec = launch.Captured("test.spill", launch.Launch.of((1,), 1, BLOCK=16384), (t, t, 16384), tuple(k.arg_names[:3]), k)
sig, const, attrs, opts = CC.specialise(rec, 90)
unit = CC.Unit(rec.name, 90, 1, sig, const, attrs, opts, kernel=k)
rows = CC.build_rows([unit], [CC.compile_unit(unit)])
print("RESULT", json.dumps({"rows": rows, "exit": CC.exit_code(rows)}, default=str))
"""


@needs_ptxas
def test_a_spilling_kernel_fails_the_check():
    res = compiled_python(_SPILL, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    (row,) = out["rows"]
    assert row["ok"] and row["spill_store_bytes"] > 0 and out["exit"] == 1
    assert any("spills" in p for p in row["problems"])


@needs_ptxas
def test_kernels_compile_for_sm80_and_sm90a():
    """The tool itself, for the tiny config's gated-residual kernels: builds for sm_80 and sm_90a,
    registers reported, no spills, exit 0 (read from the compile cache when `make test` ran it)."""
    res = compiled_python("import sys; from ivfast.compile_check import main; "
                           "sys.exit(main(['--configs', 'tiny', '--kernels', 'adaln.gated', '--no-roofline', "
                           "'--table']))")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| adaln.gated")]
    assert {r.split("|")[3].strip() for r in rows} == {"sm_80", "sm_90a"}
    assert len(rows) == 8  # fwd and bwd x bf16 and fp32 x two targets
    for r in rows:
        cells = [c.strip() for c in r.split("|")]
        assert int(cells[7]) > 0 and cells[8] == "0"  # registers, spill bytes
    assert "0 with problems" in res.stdout
