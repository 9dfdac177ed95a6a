"""What a training stage contributes to the loop: its trainable model and one forward.

The loop (``trainer.py``) is the same for every stage; a task says
- ``model``: the module DeepSpeed wraps (trainable parts, plus anything it must checkpoint),
- ``to(device, dtype)``: where its frozen helpers (the Stage-1 teacher) live,
- ``forward(engine, video, rng)``: the loss dict of one micro-batch,
- ``after_step(engine)``: work after an optimiser step (Stage 2's EMA teacher).
"""
from __future__ import annotations

import logging

import torch

from ivfast.config import Config
from ivfast.models.sample_rng import SampleRNG
from ivfast.memory.tracker import phase

log = logging.getLogger("ivfast.train")

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def teacher_dtype(precision: str, train_dtype: torch.dtype) -> torch.dtype:
    """The frozen Stage-1 teacher's dtype for ``model.teacher.precision`` ("auto": the training dtype)."""
    return train_dtype if precision == "auto" else _DTYPES[precision]


class Stage1Task:
    """Alignment to a frozen SigLIP teacher (kept outside the engine: never trained or saved) + reconstruction."""

    def __init__(self, cfg: Config):
        from ivfast.models.stage1 import build_stage1, build_teacher

        self.cfg = cfg
        self.model = build_stage1(cfg)
        self.teacher = build_teacher(cfg.model, cfg.data.num_frames)
        self.loss_names = self.model.loss_names

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """The teacher to ``device``, in ``model.teacher.precision`` (it always runs under no_grad)."""
        t_dtype = teacher_dtype(self.cfg.model.teacher.precision, dtype)
        self.teacher.to(device, t_dtype)
        log.info("teacher: %s on %s, no grad", str(t_dtype).replace("torch.", ""), device)

    def frozen_params(self) -> int:
        return sum(p.numel() for p in self.teacher.parameters())

    def forward(self, engine, video: torch.Tensor, rng: SampleRNG) -> dict:
        from ivfast.models.stage1 import teacher_step

        with phase(getattr(self, "tracker", None), "teacher"):
            mask, targets, pooled = teacher_step(self.teacher, self.cfg.model, self.model.encoder.grid, video, rng)
        seeds = torch.tensor(rng.seeds, dtype=torch.int64, device=video.device)
        video_in = video.to(next(engine.module.parameters()).dtype)
        return engine(video_in, mask.visible_idx, mask.masked_idx, targets, pooled, seeds)

    def after_step(self, engine) -> None:
        pass


class Stage2Task:
    """Latent prediction against a frozen (or EMA) copy of the Stage-1 encoder, initialised from Stage 1."""

    def __init__(self, cfg: Config):
        from ivfast.checkpoint_io import load_model_state
        from ivfast.models.stage2 import Stage2Model

        self.cfg = cfg
        self.model = Stage2Model(cfg.model, cfg.data.num_frames, cfg.data.img_size)
        self.model.load_stage1(load_model_state(cfg.model.stage2.init_checkpoint))
        self.loss_names = self.model.loss_names

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        pass  # the teacher is part of the model (it is checkpointed: an EMA teacher changes)

    def frozen_params(self) -> int:
        # ZeRO-3 partitions the teacher too: a partitioned parameter reports its size as ds_numel.
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters() if not p.requires_grad)

    def forward(self, engine, video: torch.Tensor, rng: SampleRNG) -> dict:
        from ivfast.models.stage2 import make_stage2_masks

        views = make_stage2_masks(self.cfg.model, rng, self.model.encoder.grid)
        seeds = torch.tensor(rng.seeds, dtype=torch.int64, device=video.device)
        video_in = video.to(next(engine.module.parameters()).dtype)
        args = [t for v in views for t in (v.visible_idx, v.masked_idx)]
        return engine(video_in, *args, seeds)

    def after_step(self, engine) -> None:
        momentum = self.cfg.model.stage2.teacher_momentum
        if momentum < 1.0:
            engine.module.update_teacher(momentum)


def build_task(cfg: Config):
    return Stage2Task(cfg) if cfg.model.stage == 2 else Stage1Task(cfg)
