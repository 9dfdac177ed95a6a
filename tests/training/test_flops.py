"""FLOPs per clip (counted on fake tensors) and the device peaks behind MFU."""
import pytest
import torch

from ivfast.config import load_config
from ivfast.training.flops import (
    Throughput,
    band_pairs,
    count_step_flops,
    device_peak_tflops,
    peak_tflops,
    tokens_per_clip,
)
from tests.support import ROOT

TINY = f"{ROOT}/configs/tiny.yaml"


def test_known_devices_have_their_dense_bf16_peak_and_others_none():
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == peak_tflops("NVIDIA A100 80GB PCIe") == 312
    assert peak_tflops("NVIDIA H100 80GB HBM3") == peak_tflops("NVIDIA H100 SXM5 80GB") == 989
    assert peak_tflops("NVIDIA H100 PCIe") == 756 and peak_tflops("NVIDIA H100 NVL") == 835
    assert peak_tflops("NVIDIA H200") == 989 and peak_tflops("NVIDIA H200 NVL") == 835
    assert peak_tflops("NVIDIA B200") == 2250
    for unknown in ("NVIDIA H100", "NVIDIA GH200 480GB", "NVIDIA GB200", "NVIDIA L4", "Tesla V100-SXM2-16GB",
                    "NVIDIA H100 80GB HBM3 MIG 1g.10gb", ""):
        assert peak_tflops(unknown) is None, unknown
    assert device_peak_tflops(torch.device("cpu")) == ("cpu", None)


def test_throughput_fields():
    t = Throughput(tokens_per_clip=64, flops_per_clip=2e12, world=2, peak_tflops=989.0)
    f = t.fields(10.0)
    assert f["tokens_per_s"] == 640 and f["tflops"] == pytest.approx(10.0) and f["mfu"] == pytest.approx(10 / 989)
    assert Throughput(64, 2e12).fields(10.0)["mfu"] is None  # no peak: no MFU
    assert Throughput(64, None, 1, 989.0).fields(10.0) == {"tokens_per_s": 640, "tflops": None, "mfu": None}
    assert tokens_per_clip(load_config(TINY)) == 4 * 4 * 4


def _real_count(cfg, batch: int) -> tuple[float, float]:
    """(teacher forward, student forward + backward) FLOPs of one real CPU micro-batch of ``cfg``."""
    from torch.utils.flop_counter import FlopCounterMode

    from ivfast.ops.attention import use_backend
    from ivfast.rng import SampleRNG
    from ivfast.training.step import build_step

    step = build_step(cfg)
    step.to(torch.device("cpu"), torch.float32)
    video = torch.randn(batch, 3, cfg.data.num_frames, cfg.data.img_size, cfg.data.img_size)
    rng = SampleRNG.for_step(0, 0, range(batch))
    with use_backend("math"), FlopCounterMode(display=False) as counter:
        inputs = step.prepare(video, rng)
        teacher = counter.get_total_flops()
        step.model(*inputs)["loss"].backward()
    return teacher, counter.get_total_flops() - teacher


def test_the_fake_count_equals_a_real_cpu_micro_batch_and_is_linear_in_the_batch():
    # A global predictor window: the real math path then computes exactly the pairs that count.
    over = ["model.predictor.window=1000", "model.diffusion.chunk_rows=0", "data.batch_size=2"]
    cfg = load_config(TINY, over)
    counted = count_step_flops(cfg)
    teacher, student = _real_count(cfg, 2)
    assert counted.teacher_forward == teacher > 0
    assert counted.student_forward + counted.student_backward == student
    assert 1.5 < counted.student_backward / counted.student_forward < 2.5
    four = count_step_flops(load_config(TINY, over[:-1] + ["data.batch_size=4"]))
    # per clip up to the few per-batch FLOPs (the pool's learned query is projected once a batch)
    assert four.per_clip == pytest.approx(counted.per_clip, rel=1e-4)


def test_windowed_predictor_layers_count_only_their_band():
    cfg = load_config(TINY, ["data.batch_size=2"])
    windowed = count_step_flops(cfg)
    full = count_step_flops(load_config(TINY, ["data.batch_size=2", "model.predictor.window=1000"]))
    p = cfg.model.predictor
    n = cfg.model.encoder.num_cls_tokens + tokens_per_clip(cfg)  # the predictor's sequence
    layers = [i for i in range(p.first_layer_id, p.first_layer_id + p.depth) if i % p.global_every]
    excess = len(layers) * 2 * p.heads * (p.width // p.heads) * (n * n - band_pairs(n, p.window // 2))
    assert full.student_forward - windowed.student_forward == 4 * excess
    assert full.student_backward - windowed.student_backward == 8 * excess
    assert windowed.teacher_forward == full.teacher_forward
    assert band_pairs(5, 1) == 13 and band_pairs(5, 4) == band_pairs(5, 10) == 25


def test_stage2_counts_the_teacher_encoder_in_the_model():
    cfg = load_config(f"{ROOT}/configs/stage2_tiny.yaml",
                      ["model.stage2.init_checkpoint=/nonexistent", "data.batch_size=2"])
    f = count_step_flops(cfg)
    assert f.teacher_forward == 0 and f.student_forward > 0 and f.student_backward > 0
    assert "GFLOP per clip" in f.describe()


def test_the_built_models_config_gives_the_same_count():
    """The trainer hands over its model's own config (Stage 2: no second read of the Stage-1
    checkpoint); the count is the one built from the run config."""
    from ivfast.config import stage1_config, stage2_config

    s1 = load_config(TINY, ["data.batch_size=2", "model.diffusion.chunk_rows=64"])
    assert count_step_flops(s1, stage1_config(s1)) == count_step_flops(s1)
    s2 = load_config(f"{ROOT}/configs/stage2_tiny.yaml", ["model.stage2.init_checkpoint=/nonexistent",
                                                          "data.batch_size=2"])
    assert count_step_flops(s2, stage2_config(s2)) == count_step_flops(s2)
