"""One training step per stage, written once.

``step.prepare(video, rng)`` does everything outside the trainable model: the frozen teacher's
forward, the mask, the gathers at the visible tokens, the reconstruction subset, each diffusion
row's timestep and noise seed. Every random draw comes from the samples' own streams (``rng``,
:class:`ivfast.rng.SampleRNG`) and happens here, so the model's forward takes plain tensors
and never waits on the host. ``step.forward(engine, video, rng)`` is ``engine(*prepare(...))``:
the trainer, the step benchmarks, the memory measurements and the tests all run this.
"""
from __future__ import annotations

import contextlib
import logging
from typing import NamedTuple, Optional

import torch

from ivfast.checkpoint_io import load_model_state
from ivfast.config import Config, chunking_allowed, stage1_config, stage2_config
from ivfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ivfast.masks import MaskInfo, multiblock_masks, num_reconstructed, semantic_mask, tube_mask
from ivfast.models.init import apply_init
from ivfast.models.layers import count_parameters
from ivfast.models.pretrained import load_encoder_weights
from ivfast.models.stage1 import Stage1Model
from ivfast.models.stage2 import Stage2Model
from ivfast.models.teacher import SigLIPTeacher, TeacherOutput, prepare_teacher_input, teacher_return_layers
from ivfast.models.weights import load_modernbert_predictor, load_siglip_teacher
from ivfast.ops.attention import use_backend
from ivfast.ops.diffusion_noise import row_seeds
from ivfast.rng import SampleRNG
from ivfast.training.activation_checkpoint import apply_activation_checkpointing
from ivfast.training.phase_tracker import PhaseTracker, phase

log = logging.getLogger("ivfast.train")

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def teacher_dtype(precision: str, train_dtype: torch.dtype) -> torch.dtype:
    """The frozen Stage-1 teacher's dtype for ``model.teacher.precision`` ("auto": the training dtype)."""
    return train_dtype if precision == "auto" else _DTYPES[precision]


def build_teacher(cfg: Config) -> SigLIPTeacher:
    """The frozen image teacher: random from ``teacher.init_seed`` (the same on every rank), or
    ``teacher.weights``."""
    t = cfg.model.teacher
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.init_seed)
        teacher = SigLIPTeacher.from_config(
            t, return_layers=teacher_return_layers(t.depth, cfg.model.align.num_layers, t.layer_interval))
    if t.weights:
        report = load_siglip_teacher(teacher, t.weights)
        log.info("teacher weights from %s: %s", t.weights, report.summary())
    return teacher.freeze()


@torch.no_grad()
def run_teacher(teacher: SigLIPTeacher, video: torch.Tensor, img_size: int, attention: str = "same") -> TeacherOutput:
    """The teacher on every frame of ``video`` (normalised with ImageNet statistics), in its own
    dtype, under the attention backend ``attention`` ("same": the current one)."""
    dtype = next(teacher.parameters()).dtype
    frames = prepare_teacher_input(video.float(), img_size, IMAGENET_MEAN, IMAGENET_STD).to(dtype)
    with contextlib.nullcontext() if attention == "same" else use_backend(attention):
        return teacher(frames)


def visible_teacher_layers(layers: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
    """(K, B*T, L, W) -> (K, B, N_vis, W): the teacher layers at the visible tokens. Frames are
    b-major, so sample b's tokens are ``layers[:, b*T:(b+1)*T]`` flattened t-major, the encoder's
    token order."""
    k, _, _, w = layers.shape
    b, n = visible_idx.shape
    idx = visible_idx.to(layers.device).view(1, b, n, 1).expand(k, b, n, w)
    return layers.reshape(k, b, -1, w).gather(2, idx)


def init_encoder_from(encoder, export_dir: str) -> bool:
    """Load ``model.init_from`` (an ``ivfast-export`` directory, also ``--from-release``) into the
    run's encoder; False when the key is empty. Any architecture difference but the frame count stops
    the run (:func:`ivfast.models.pretrained.load_encoder_weights`)."""
    if not export_dir:
        return False
    report = load_encoder_weights(encoder, export_dir)
    log.info("encoder initialised from %s: %s", export_dir, report.summary())
    return True


def draw_mask(cfg: Config, rng: SampleRNG, grid: tuple[int, int, int], saliency=None) -> MaskInfo:
    """The step's Stage-1 mask from each clip's ``mask`` stream: semantic (teacher saliency) or tube."""
    m = cfg.model
    t, h, w = grid
    generators = rng.generators("mask")
    if m.mask_type == "semantic":
        return semantic_mask(saliency, len(rng), t, m.mask_ratio, generator=generators)
    return tube_mask(len(rng), t, h * w, m.mask_ratio, device=rng.device, generator=generators)


def draw_views(cfg: Config, rng: SampleRNG, grid: tuple[int, int, int]) -> list[MaskInfo]:
    """The step's two Stage-2 multi-block views from each clip's ``stage2_mask`` stream
    (``model.stage2.equalise`` and ``block_shape``: see :mod:`ivfast.masks.multiblock`)."""
    s = cfg.model.stage2
    return multiblock_masks(len(rng), grid, rng.generators("stage2_mask"), small_blocks=s.small_blocks,
                            small_scale=s.small_scale, large_blocks=s.large_blocks, large_scale=s.large_scale,
                            aspect=(s.aspect_min, s.aspect_max), max_visible=s.max_visible,
                            equalise=s.equalise, block_shape=s.block_shape)


def reconstruction_subset(masked_idx: torch.Tensor, ratio: float, rng: SampleRNG) -> torch.Tensor:
    """The masked tokens the diffusion loss sees: all (ratio 1, nothing drawn), or per sample
    :func:`~ivfast.masks.num_reconstructed` of them from its ``diffusion_subset`` stream, ascending."""
    if ratio >= 1.0:
        return masked_idx
    m = masked_idx.shape[1]
    keep = num_reconstructed(m, ratio)
    scores = rng.rand("diffusion_subset", m)  # (B, N_mask): a random permutation per sample
    chosen = scores.argsort(dim=1)[:, :keep].sort(dim=1).values.to(masked_idx.device)
    return masked_idx.gather(1, chosen)


class Stage1Inputs(NamedTuple):
    """The arguments of :meth:`ivfast.models.stage1.Stage1Model.forward`, in order."""

    video: torch.Tensor
    visible_idx: torch.Tensor
    recon_idx: Optional[torch.Tensor]
    teacher_layers: torch.Tensor
    teacher_pooled: torch.Tensor
    diffusion_t: Optional[torch.Tensor]
    diffusion_seeds: Optional[torch.Tensor]


class Step:
    """What the loop needs of a stage: ``model`` (what DeepSpeed wraps), ``loss_names``,
    ``to(device, dtype)``, ``frozen_params()``, ``prepare(video, rng)``; ``forward`` and
    ``after_step`` are shared."""

    dtype = torch.float32  # the inputs' dtype, set by ``to``
    tracker: PhaseTracker | None = None

    @classmethod
    def around(cls, cfg: Config, model, teacher=None) -> "Step":
        """A step of ``cfg`` around a model (and Stage 1's teacher) built elsewhere, e.g. on fake
        tensors to count FLOPs: ``prepare`` runs as in training; nothing is built, loaded or
        initialised."""
        step = cls.__new__(cls)
        step.cfg, step.model, step.loss_names = cfg, model, model.loss_names
        if teacher is not None:
            step.teacher = teacher
        return step

    def forward(self, engine, video: torch.Tensor, rng: SampleRNG) -> dict:
        """The loss dict of one micro-batch: ``engine(*self.prepare(video, rng))``."""
        return engine(*self.prepare(video, rng))

    def after_step(self, engine) -> None:
        pass


class Stage1Step(Step):
    """Alignment to a frozen SigLIP teacher (kept outside the engine: never trained or saved) +
    reconstruction of masked patches."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        mc = stage1_config(cfg)
        if mc.diffusion.chunk_rows and not chunking_allowed(cfg.deepspeed.zero_stage):
            log.info("model.diffusion.chunk_rows=%d: off under deepspeed.zero_stage %d (plain autograd for the head)",
                     mc.diffusion.chunk_rows, cfg.deepspeed.zero_stage)
            mc.diffusion.chunk_rows = 0
        self.model = Stage1Model(mc)
        apply_init(self.model, cfg.model.init)  # before any weights are loaded into it
        init_encoder_from(self.model.encoder, cfg.model.init_from)
        init = cfg.model.predictor.init_weights
        if init and mc.recon != "none":  # ModernBERT text weights for the predictor's layers
            report = load_modernbert_predictor(self.model.predictor, init)
            log.info("predictor initialised from %s: %s", init, report.summary())
        apply_activation_checkpointing(self.model, cfg.model.checkpointing)
        self.teacher = build_teacher(cfg)
        self.loss_names = self.model.loss_names

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """The teacher to ``device`` in ``model.teacher.precision``; inputs will be cast to ``dtype``."""
        self.dtype = dtype
        t_dtype = teacher_dtype(self.cfg.model.teacher.precision, dtype)
        self.teacher.to(device, t_dtype)
        log.info("teacher: %s on %s, no grad", str(t_dtype).replace("torch.", ""), device)

    def frozen_params(self) -> int:
        return count_parameters(self.teacher)

    @torch.no_grad()
    def prepare(self, video: torch.Tensor, rng: SampleRNG) -> Stage1Inputs:
        m = self.cfg.model
        grid = self.model.encoder.grid
        with phase(self.tracker, "teacher"):
            tout = run_teacher(self.teacher, video, m.teacher.img_size, m.teacher.attention)
            mask = draw_mask(self.cfg, rng, grid, tout.saliency)
            targets = visible_teacher_layers(tout.layers, mask.visible_idx)  # frees the full-token layers
            pooled = tout.pooled
            del tout
        recon_idx = t = seeds = None
        if m.recon == "diffusion":
            recon_idx = reconstruction_subset(mask.masked_idx, m.diffusion.reconstruction_ratio, rng)
            mul, n = m.diffusion.batch_mul, recon_idx.shape[1]
            t = rng.randint("diffusion_t", m.diffusion.num_timesteps, mul, n).reshape(-1)
            # rows sample-major (b, repeat, token); row r's eps comes from Philox(seeds[r])
            seeds = row_seeds(rng.stream_seeds("diffusion_noise"), mul * n)
        elif m.recon == "linear":
            recon_idx = mask.masked_idx
        return Stage1Inputs(video.to(self.dtype), mask.visible_idx, recon_idx, targets, pooled, t, seeds)


class Stage2Step(Step):
    """Latent prediction against a frozen (or EMA) copy of the Stage-1 encoder, initialised from Stage 1."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        stage1 = load_model_state(cfg.model.stage2.init_checkpoint)  # read once: table shapes, then weights
        self.model = Stage2Model(stage2_config(cfg, stage1))
        apply_init(self.model, cfg.model.init)  # before the Stage-1 weights are loaded
        self.model.load_stage1(stage1)
        del stage1
        if init_encoder_from(self.model.encoder, cfg.model.init_from):  # the student and its teacher
            self.model.copy_encoder_to_teacher()
        apply_activation_checkpointing(self.model, cfg.model.checkpointing)
        self.loss_names = self.model.loss_names

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        self.dtype = dtype  # the teacher is part of the model (checkpointed: an EMA teacher changes)

    def frozen_params(self) -> int:
        return count_parameters(self.model, trainable=False)

    @torch.no_grad()
    def prepare(self, video: torch.Tensor, rng: SampleRNG) -> tuple:
        """(video, vis0, msk0, vis1, msk1): the two views of :func:`draw_views`."""
        views = draw_views(self.cfg, rng, self.model.encoder.grid)
        return (video.to(self.dtype), *(t for v in views for t in (v.visible_idx, v.masked_idx)))

    def after_step(self, engine) -> None:
        momentum = self.cfg.model.stage2.teacher_momentum
        if momentum < 1.0:
            engine.module.update_teacher(momentum)


def build_step(cfg: Config) -> Step:
    """The step of ``cfg``'s stage, its model built (on the CPU, fp32) with checkpointing applied."""
    return Stage2Step(cfg) if cfg.model.stage == 2 else Stage1Step(cfg)
