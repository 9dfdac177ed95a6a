"""The analytic memory model: exact parameter counts, ZeRO arithmetic, activation formulas
against bytes measured with saved-tensor hooks on the CPU, and the release's way vs the paper."""
import pytest
import torch

from ivfast.config import load_config
from ivfast.memory import analytic
from ivfast.memory.params import count_params
from ivfast.memory.saved_tensors import measure_stage1, saved_bytes

ROWS = {"align": 22.0, "linear": 41.0, "diffusion": 48.0}


def _vit_b_encoder_params(d=768, depth=12, hidden=3072, tokens=4096, cls=4, patch=588):
    # release block: RMSNorm x2 + QK-norm x2 (d each), qkv (no bias), proj (+bias), LayerScale x2, MLP
    block = 4 * d + 3 * d * d + d * d + d + 2 * d + (d * hidden + hidden) + (hidden * d + d)
    embed = patch + (patch * d + d) + d  # RMSNorm in, Linear, RMSNorm out
    return depth * block + embed + cls * d + (cls + tokens) * d  # CLS tokens, learnable position table


def test_encoder_parameter_count_is_exact():
    counts = count_params(load_config("configs/stage1_b_align.yaml"))
    assert counts.trainable["encoder"] == _vit_b_encoder_params()


def test_teacher_and_predictor_counts_match_formulas():
    counts = count_params(load_config("configs/stage1_b_linear.yaml"))
    w, m, depth = 1536, 6144, 40
    layer = 4 * (w * w + w) + (w * m + m) + (m * w + w) + 4 * w
    head = w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (w * m + m) + (m * w + w)
    assert counts.teacher == depth * layer + (3 * 16 * 16 * w + w) + 256 * w + 2 * w + head
    pw, ph, d = 1024, 2624, 768
    pred_layer = pw + 3 * pw * pw + pw * pw + pw + pw * 2 * ph + ph * pw
    in_proj = (d * d + d) + (d * pw + pw) + 2 * pw
    assert counts.trainable["predictor"] == 5 * pred_layer + in_proj + d + (4 + 4096) * d
    assert counts.trainable["linear head"] == pw * 588 + 588


def test_zero_partitioning_arithmetic():
    p = 1_000_000
    s0 = analytic.static_bytes(p, 0, 8, 0)
    assert s0["weights"] == 2 * p and s0["gradients"] == 6 * p and s0["optimizer states"] == 12 * p
    s1 = analytic.static_bytes(p, 1, 4, 500)
    assert s1["weights"] == 2 * p and s1["gradients"] == 2 * p and s1["optimizer states"] == 3 * p
    assert s1["gradient bucket"] == 1000 and s1["step: fp32 gradient partition"] == p
    s2 = analytic.static_bytes(p, 2, 4, 10**9)
    assert s2["gradients"] == p / 2 and s2["gradient bucket"] == 2 * p
    s3 = analytic.static_bytes(p, 3, 4, 0)
    assert s3["weights"] == p / 2 and "gradient bucket" not in s3


def test_rmsnorm_saved_bytes_formula():
    from ivfast.models.layers import RMSNorm

    for dtype, a in ((torch.float32, 4), (torch.bfloat16, 2)):
        norm = RMSNorm(48).to(dtype)
        x = torch.randn(7, 48, dtype=dtype, requires_grad=True)
        got, _ = saved_bytes(lambda: norm(x), params=norm.parameters())
        extra = 48 * 4 if a == 2 else 0  # weight.float() copy
        assert got.total == 7 * analytic.rmsnorm(48, a, fused=False) + extra


SMALL = [
    ["model.encoder.drop_path=0.0"],
    ["model.encoder.drop_path=0.0", "data.batch_size=3", "model.mask_ratio=0.5", "model.recon=linear"],
    ["model.encoder.drop_path=0.0", "data.num_frames=2", "model.encoder.width=96", "model.encoder.heads=6",
     "model.predictor.width=48", "model.diffusion.width=80", "model.diffusion.depth=3"],
    ["model.encoder.drop_path=0.0", "model.diffusion.chunk_rows=0"],  # the diffusion head without chunking
    ["model.encoder.drop_path=0.0", "model.diffusion.chunk_rows=7", "model.diffusion.learn_sigma=false"],
]


@pytest.mark.parametrize("overrides", SMALL)
@pytest.mark.parametrize("dtype,attention,lean", [(torch.float32, "math", False), (torch.bfloat16, "sdpa", True),
                                                  (torch.bfloat16, "sdpa", False)])
def test_activation_formulas_match_saved_tensors(overrides, dtype, attention, lean):
    """Per component within 10%, in total within 5% (release-like: math attention, fp32, plain
    MLPs; ivfast-like: bf16 with O(N) attention, lean MLPs); fused kernels off."""
    cfg = load_config("configs/tiny.yaml", ["model.fused_kernels=false", f"model.lean_saves={str(lean).lower()}"]
                      + overrides)
    measured = measure_stage1(cfg, dtype, attention)
    a = 2 if dtype == torch.bfloat16 else 4
    way = analytic.Way("check", act_bytes=a, attention="math" if attention == "math" else "flash", diffusion_bytes=a,
                       lean=lean, predictor_v_copy=True, diffusion_chunk_rows=cfg.model.diffusion.chunk_rows)
    est = analytic.estimate(cfg, way)
    for comp, model_bytes in est.activations.items():
        got = measured.by_component[comp]
        assert abs(model_bytes / got - 1) < 0.10, (comp, model_bytes, got)
    total = sum(est.activations.values())
    assert abs(total / measured.total - 1) < 0.05, (total, measured.total)


def test_checkpointing_and_subsampling_reduce_the_model():
    cfg = load_config("configs/stage1_b_diffusion.yaml")
    base = analytic.estimate(cfg, analytic.ivfast_way(cfg, ()))
    ck = analytic.estimate(cfg, analytic.ivfast_way(cfg, ("encoder", "predictor", "diffusion")))
    assert ck.peak < base.peak
    for chunk in (0, 8192):  # chunked: the float32 parameter gradients do not scale with the rows
        full = analytic.ivfast_way(cfg, ())
        full.diffusion_chunk_rows = chunk
        half = analytic.ivfast_way(cfg, ())
        half.reconstruction_ratio, half.diffusion_chunk_rows = 0.5, chunk
        base, sub = analytic.estimate(cfg, full), analytic.estimate(cfg, half)
        fixed = 4 * base.params.trainable["diffusion head"] if chunk else 0
        assert sub.activations["diffusion head"] - fixed == pytest.approx(
            (base.activations["diffusion head"] - fixed) / 2, rel=0.01)


def test_chunked_diffusion_head_in_the_model():
    """model.diffusion.chunk_rows (default 8192): the head keeps grad z + float32 parameter
    gradients; one chunk becomes a transient; off under ZeRO-3 (as in the trainer)."""
    cfg = load_config("configs/stage1_b_diffusion.yaml")
    assert cfg.model.diffusion.chunk_rows == 8192
    way = analytic.ivfast_way(cfg, ())
    assert way.diffusion_chunk_rows == 8192
    est = analytic.estimate(cfg, way)
    s = analytic.shapes(cfg)
    rows = s.batch * s.masked
    assert est.activations["diffusion head"] == rows * cfg.model.predictor.width * 2 + 4 * est.params.trainable[
        "diffusion head"]
    assert "diffusion chunk (forward + backward)" in est.transients and "diffusion layer" not in est.transients
    z3 = analytic.estimate(cfg, way, zero_stage=3)
    off = analytic.ivfast_way(cfg, ())
    off.diffusion_chunk_rows = 0
    assert z3.activations["diffusion head"] == analytic.estimate(cfg, off).activations["diffusion head"]
    assert est.peak < analytic.estimate(cfg, off).peak


@pytest.mark.parametrize("row", ["align", "linear"])
def test_release_way_within_20_percent_of_the_paper(row):
    cfg = load_config(f"configs/stage1_b_{row}.yaml")
    gib = analytic.estimate(cfg, analytic.release_way(cfg)).gib()
    assert abs(gib / ROWS[row] - 1) <= 0.20, gib


@pytest.mark.xfail(strict=True, reason="the release's fp32 diffusion head saves 25.3 GiB of activations at "
                   "52k rows x 1536 wide x 6 blocks (the release's own head, measured on the CPU by "
                   "benchmarks/release_head_memory.py, agrees to a byte per row); the step lands ~30% above "
                   "the paper's 48 GB, ~-1.4% with the release constructor's default head (3 x 1024): see the report")
def test_release_way_diffusion_row_within_20_percent():
    cfg = load_config("configs/stage1_b_diffusion.yaml")
    gib = analytic.estimate(cfg, analytic.release_way(cfg)).gib()
    assert abs(gib / ROWS["diffusion"] - 1) <= 0.20, gib


GOALS = {"align": 11.0, "linear": 20.0, "diffusion": 24.0}  # issue 6: half the paper's, no checkpointing


@pytest.mark.parametrize("row", list(GOALS))
def test_ivfast_way_meets_the_goals_without_checkpointing(row):
    """ViT-B, batch 16, 16 frames, mask 0.8, one GPU, ZeRO-1, the config's own switches and no
    activation checkpointing: the modelled peak (CUDA context included) is within the goal."""
    cfg = load_config(f"configs/stage1_b_{row}.yaml")
    assert cfg.data.batch_size == 16 and cfg.data.num_frames == 16 and cfg.model.mask_ratio == 0.8
    assert not cfg.model.checkpointing
    gib = analytic.estimate(cfg, analytic.ivfast_way(cfg, ()), world=1).gib()
    assert gib <= GOALS[row], gib


def test_release_head_script_uses_the_models_head_bytes():
    """benchmarks/release_head_memory.py swaps the model's head activations for measured bytes
    per row: its per-row model times the rows (+ fp32 weight copies) is the estimate's head."""
    from benchmarks.release_head_memory import model_per_row

    cfg = load_config("configs/stage1_b_diffusion.yaml")
    way = analytic.release_way(cfg)
    est = analytic.estimate(cfg, way)
    s = analytic.shapes(cfg)
    copies = est.params.trainable["diffusion head"] * (way.diffusion_bytes - way.act_bytes)
    assert model_per_row(cfg, way)["total"] * s.batch * s.masked + copies == est.activations["diffusion head"]
