"""FLOPs of one training step, counted once at start, and the device peaks that turn them into MFU.

:func:`count_step_flops` counts one micro-batch of the run's shapes with
``torch.utils.flop_counter.FlopCounterMode``: the frozen teacher's forward (Stage 1's SigLIP
tower; Stage 2's teacher encoder runs inside the model and is counted with it), the student's
forward and its backward. Nothing is computed: the models are built on the meta device and
turned into fake tensors (``FakeTensorMode``: shapes only, on the CPU), so ViT-B's step counts in
seconds. The step's own ``prepare`` (:mod:`ivfast.training.step`) draws the masks, on real CPU
tensors at the run's shapes (the teacher's saliency is a random stand-in), so the token counts
are the run's. The count is of model FLOPs, the usual MFU convention:

- attention runs as explicit matmuls (the ``math`` backend), so the counter sees it; the
  predictor's windowed layers count only the (query, key) pairs inside the window, as FlashAttention
  computes them, not the full square that the math path evaluates;
- no activation-checkpointing recomputation, no fused kernels or lean saves (the same matmuls),
  the diffusion head unchunked (the same FLOPs as chunked);
- Stage 2's visible-token counts are those of the first batch's masks (they vary per batch).

MFU is achieved FLOP/s per device over the device's dense bf16 tensor-core peak
(:func:`peak_tflops`): a table of known devices matched on ``torch.cuda.get_device_name()``;
any other device, a MIG slice or the CPU gets None, never a guessed peak.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch

from ivfast.config import Config, stage1_config, stage2_config
from ivfast.models.predictor import ModernBertAttention
from ivfast.models.stage1 import Stage1Model
from ivfast.models.stage2 import Stage2Model
from ivfast.models.teacher import TeacherOutput
from ivfast.ops import dispatch
from ivfast.ops.attention import use_backend
from ivfast.rng import SampleRNG
from ivfast.training.step import Stage1Step, Stage2Step, build_teacher

# Dense (no 2:4 sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets (they print
# the sparse figure, twice these): A100 SXM4/PCIe 312; H100 SXM 989, H100 PCIe 756, H100 NVL 835;
# H200 SXM 989, H200 NVL 835; HGX B200 2250 (4.5 PFLOP/s sparse). Matched in order on the
# device name (case-insensitive); the first match wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bA100\b", 312.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*(\bSXM|\bHBM3\b)", 989.0),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (r"\bH200\b.*\bNVL\b", 835.0),
    (r"\bH200\b", 989.0),
    (r"\bB200\b", 2250.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device named ``device_name`` (``torch.cuda.get_device_name``), or
    None when it is not in :data:`PEAK_BF16_TFLOPS` or is a MIG slice (a fraction of the chip)."""
    if not device_name or re.search(r"\bMIG\b", device_name, re.IGNORECASE):
        return None
    for pattern, value in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return value
    return None


def device_peak_tflops(device: torch.device) -> tuple[str, float | None]:
    """(the device's name, its dense bf16 peak or None); the CPU has no peak."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, peak_tflops(name)


def tokens_per_clip(cfg: Config) -> int:
    """The encoder's tokens in one clip (all of them, masked ones included): what tokens/s counts."""
    e, d = cfg.model.encoder, cfg.data
    return (d.num_frames // e.tubelet_size) * (d.img_size // e.patch_size) ** 2


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one micro-batch of ``batch_size`` clips."""

    batch_size: int
    teacher_forward: float  # Stage 1's frozen teacher (0 for Stage 2: its teacher is in the model)
    student_forward: float
    student_backward: float

    @property
    def per_step(self) -> float:
        return self.teacher_forward + self.student_forward + self.student_backward

    @property
    def per_clip(self) -> float:
        return self.per_step / self.batch_size

    def describe(self) -> str:
        t = 1e9 * self.batch_size
        parts = [f"student forward {self.student_forward / t:.4g}", f"backward {self.student_backward / t:.4g}"]
        if self.teacher_forward:
            parts.insert(0, f"teacher forward {self.teacher_forward / t:.4g}")
        return f"{self.per_clip / 1e9:.4g} GFLOP per clip ({', '.join(parts)})"


def achieved_tflops(flops_per_clip: float | None, clips_per_s: float | None, world: int) -> float | None:
    """TFLOP/s per device from the global clips/s."""
    if not flops_per_clip or clips_per_s is None:
        return None
    return flops_per_clip * clips_per_s / max(1, world) / 1e12


def mfu(tflops: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation (a fraction), or None without a known peak."""
    return tflops / peak if tflops is not None and peak else None


@dataclass(frozen=True)
class Throughput:
    """Turns the global clips/s of a log interval into tokens/s, TFLOP/s per device and MFU."""

    tokens_per_clip: int
    flops_per_clip: float | None  # None: not counted (TFLOP/s and MFU are then None)
    world: int = 1
    peak_tflops: float | None = None

    def fields(self, clips_per_s: float | None) -> dict:
        tflops = achieved_tflops(self.flops_per_clip, clips_per_s, self.world)
        return {"tokens_per_s": None if clips_per_s is None else clips_per_s * self.tokens_per_clip,
                "tflops": tflops, "mfu": mfu(tflops, self.peak_tflops)}


class _SaliencyStandIn(torch.nn.Module):
    """The (fake-tensor) teacher, its saliency replaced by real random numbers of its shape: the
    semantic mask is drawn from real values, the rest stays shapes only."""

    def __init__(self, teacher: torch.nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, frames: torch.Tensor) -> TeacherOutput:
        out = self.teacher(frames)
        return TeacherOutput(out.layers, out.pooled, torch.rand(tuple(out.saliency.shape)))


def _watch_windows(model: torch.nn.Module, calls: list) -> None:
    """Record (batch, tokens, heads, head dim, half window, needs grad) of each windowed attention
    call of ``model`` (a throwaway copy: its instances' ``attend`` is wrapped)."""
    for m in model.modules():
        if isinstance(m, ModernBertAttention) and m.window is not None:
            def attend(qkv, cos, sin, _m=m, _inner=m.attend):
                b, n, _ = qkv.shape
                calls.append((b, n, _m.heads, _m.head_dim, _m.window, qkv.requires_grad))
                return _inner(qkv, cos, sin)

            m.attend = attend


def band_pairs(n: int, half_window: int) -> int:
    """The (query, key) pairs with |i - j| <= half_window among n tokens."""
    if half_window >= n - 1:
        return n * n
    return n * (2 * half_window + 1) - half_window * (half_window + 1)


def _window_excess(calls: list) -> tuple[int, int]:
    """(forward, backward) FLOPs that the math path counts beyond the windows' pairs: QK^T and PV
    are 2 FLOPs per pair and head dim each in the forward, their four gradients 8 in the backward."""
    fwd = bwd = 0
    for b, n, heads, dh, w, grad in calls:
        extra = (n * n - band_pairs(n, w)) * b * heads * dh
        fwd += 4 * extra
        bwd += 8 * extra if grad else 0
    return fwd, bwd


def count_step_flops(cfg: Config, model_cfg=None) -> StepFlops:
    """Count one micro-batch (``data.batch_size`` clips) of ``cfg``'s step: see the module docstring.
    ``model_cfg``: the built model's own config (``step.model.cfg``), so that Stage 2 does not
    read its Stage-1 checkpoint again for the position table's shape; else built from ``cfg``."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    c = copy.deepcopy(cfg)
    m = c.model
    m.checkpointing = []
    m.diffusion.chunk_rows = 0
    m.init_from = m.teacher.weights = m.predictor.init_weights = ""
    m.teacher.attention = "same"
    stage2 = m.stage == 2
    if model_cfg is None:
        own = stage2_config(c) if stage2 else stage1_config(c)
    else:
        own = copy.deepcopy(model_cfg)
        if not stage2:
            own.diffusion.chunk_rows = 0
    with torch.device("meta"):
        model = Stage2Model(own) if stage2 else Stage1Model(own)
        teacher = None if stage2 else build_teacher(c)
    b, d = c.data.batch_size, c.data
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        model.to_empty(device="cpu")
        if teacher is not None:
            teacher.to_empty(device="cpu")
        video = torch.empty(b, 3, d.num_frames, d.img_size, d.img_size)
    model.train()
    stand_in = None if teacher is None else _SaliencyStandIn(teacher)
    probe = (Stage2Step if stage2 else Stage1Step).around(c, model, stand_in)  # the step's prepare, on these models
    calls: list = []
    _watch_windows(model, calls)
    rng = SampleRNG.for_step(c.train.seed, 0, range(b), "cpu")
    with dispatch.override(fused=False, lean=False), use_backend("math"), \
            FlopCounterMode(display=False) as counter:
        inputs = probe.prepare(video, rng)
        teacher_flops = counter.get_total_flops()
        inputs = [fake.from_tensor(x) if type(x) is torch.Tensor else x for x in inputs]
        out = model(*inputs)
        forward = counter.get_total_flops() - teacher_flops
        out["loss"].backward()
        backward = counter.get_total_flops() - teacher_flops - forward
    fwd_excess, bwd_excess = _window_excess(calls)
    return StepFlops(b, float(teacher_flops), float(forward - fwd_excess), float(backward - bwd_excess))
