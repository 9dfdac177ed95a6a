"""Stage 1: the student (encoder, alignment heads, predictor, reconstruction head) and its frozen teacher.

One model serves the paper's three memory-table rows through ``model.recon``:
``none`` (Align only), ``linear`` (Align + Linear Recon), ``diffusion`` (Align + Diffusion Recon).

Data flow of a step (see :meth:`Stage1Model.forward`):
  video -> encoder(visible tokens) -> per-layer alignment heads vs teacher layers (visible tokens)
                                    -> attention pool -> final head vs teacher pooled (mean over frames)
                                    -> predictor(full sequence: encoder tokens + mask tokens)
                                       -> at masked positions: linear MSE or diffusion loss on pixels.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from ivfast.config import Config, ModelConfig
from kernels.diffusion_noise import row_seeds

from ivfast.models import masking, token_ops
from ivfast.models.chunked_loss import chunking_allowed
from ivfast.models.diffloss import DiffusionLoss
from ivfast.models.encoder import VideoEncoder
from ivfast.models.heads import AttentionPool, MLPHead, cosine_align_loss
from ivfast.models.pos_embed import PositionTable
from ivfast.models.predictor import predict_masked, predictor_from_config
from ivfast.models.sample_rng import SampleRNG
from ivfast.models.weights import load_modernbert_predictor, load_siglip_teacher
from ivfast.models.teacher import SigLIPTeacher, TeacherOutput, prepare_teacher_input, teacher_return_layers


log = logging.getLogger("ivfast.model")


def patchify(video: torch.Tensor, patch: int, tubelet: int = 1) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T/tub * H/p * W/p, C * tub * p * p), tokens t-major then rows then columns.

    Per token the values are ordered (c, tubelet, ph, pw): for tubelet 1 this is
    ``pixel_unshuffle(frame, p)``'s channel order (588 = 3 x 14 x 14 values for p = 14).
    """
    b, c, t, h, w = video.shape
    x = video.reshape(b, c, t // tubelet, tubelet, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (t // tubelet) * (h // patch) * (w // patch), c * tubelet * patch * patch)


def student_return_layers(depth: int, k: int) -> list[int]:
    """The last ``k`` encoder blocks, ascending (the release's interval of 1)."""
    return list(range(depth - k, depth))


class Stage1Model(nn.Module):
    """The trainable part of Stage 1. The teacher is separate (frozen, outside the optimiser)."""

    def __init__(self, cfg: ModelConfig, num_frames: int, img_size: int):
        super().__init__()
        e, a, p = cfg.encoder, cfg.align, cfg.predictor
        self.cfg = cfg
        self.recon = cfg.recon
        self.loss_weights = list(cfg.loss_weights)
        self.patch, self.tubelet = e.patch_size, e.tubelet_size
        self.encoder = VideoEncoder(
            img_size=img_size, patch_size=e.patch_size, num_frames=num_frames, tubelet_size=e.tubelet_size,
            width=e.width, depth=e.depth, heads=e.heads, mlp_ratio=e.mlp_ratio, block=e.block,
            num_cls_tokens=e.num_cls_tokens, layer_scale_init=e.layer_scale_init, drop_path=e.drop_path,
            pos_learnable=e.pos_learnable, return_layers=student_return_layers(e.depth, a.num_layers),
            fused=cfg.fused_kernels, checkpointing="encoder" in cfg.checkpointing, lean_mlp=cfg.lean_mlp,
        )
        grid = self.encoder.grid
        teacher_width = cfg.teacher.width
        self.align_pos = PositionTable(e.width, *grid, num_cls=0, learnable=e.pos_learnable)
        self.align_heads = nn.ModuleList(
            MLPHead(e.width, teacher_width, hidden=a.head_hidden or None, l2=True) for _ in range(a.num_layers)
        )
        self.pool = AttentionPool(e.width, a.pool_heads, a.pool_dim)
        self.final_head = MLPHead(a.pool_dim, teacher_width, l2=True)
        for head in [*self.align_heads, self.final_head]:
            head.lean = cfg.lean_mlp

        self.target_dim = 3 * e.tubelet_size * e.patch_size**2
        if self.recon != "none":
            self.mask_token = nn.Parameter(torch.zeros(e.width))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            self.predictor_pos = PositionTable(e.width, *grid, num_cls=e.num_cls_tokens, learnable=e.pos_learnable)
            self.predictor = predictor_from_config(p, e.width, checkpointing="predictor" in cfg.checkpointing,
                                                   lean_mlp=cfg.lean_mlp)
            if p.init_weights:  # ModernBERT text weights for the predictor's layers (local file)
                report = load_modernbert_predictor(self.predictor, p.init_weights)
                log.info("predictor initialised from %s: %s", p.init_weights, report.summary())
        if self.recon == "linear":
            self.recon_head = nn.Linear(p.width, self.target_dim)
        elif self.recon == "diffusion":
            d = cfg.diffusion
            self.diffloss = DiffusionLoss(
                self.target_dim, p.width, width=d.width, depth=d.depth, num_timesteps=d.num_timesteps,
                schedule=d.schedule, learn_sigma=d.learn_sigma, batch_mul=d.batch_mul, fused=cfg.fused_kernels,
                precision=d.precision, checkpointing="diffusion" in cfg.checkpointing,
            )
            self.diffloss.lean = cfg.lean_mlp
            self.diffloss.chunk_rows = d.chunk_rows

    @property
    def loss_names(self) -> list[str]:
        """The keys :meth:`forward` returns, in a fixed order (every rank agrees on it)."""
        names = ["loss", "loss_align_layers", "loss_align_final"]
        if self.recon != "none":
            names.append("loss_recon")
        if self.recon == "diffusion":
            names += ["diff_mse"] + (["diff_vb"] if self.diffloss.learn_sigma else [])
        return names

    # -- pieces -------------------------------------------------------------------------

    def align_losses(self, enc, visible_idx, teacher_layers, teacher_pooled):
        """Per-layer alignment on visible tokens and the final pooled alignment; ``teacher_layers``
        (K, B, N_vis, W): the visible tokens (:func:`visible_teacher_layers`)."""
        b = visible_idx.shape[0]
        ncls = enc.num_cls
        pos = self.align_pos()[visible_idx]  # (B, N_vis, D)
        k, _, _, tw = teacher_layers.shape
        if teacher_layers.shape[1:3] != visible_idx.shape:
            raise ValueError(f"teacher_layers must be (K, B, N_vis, W) for visible_idx {tuple(visible_idx.shape)}, "
                             f"got {tuple(teacher_layers.shape)}: gather them with visible_teacher_layers")
        layer_losses = []
        for i, head in enumerate(self.align_heads):
            pred = head(enc.layers[i][:, ncls:] + pos)
            layer_losses.append(cosine_align_loss(pred, teacher_layers[i].to(pred.dtype), lean=self.cfg.lean_mlp))
        loss_layers = torch.stack(layer_losses).mean()
        final_target = teacher_pooled.reshape(b, -1, tw).mean(1)
        final_pred = self.final_head(self.pool(enc.tokens))
        loss_final = cosine_align_loss(final_pred, final_target.to(final_pred.dtype), lean=self.cfg.lean_mlp)
        return loss_layers, loss_final

    def reconstruction_subset(self, masked_idx: torch.Tensor, rng: SampleRNG) -> torch.Tensor:
        """The masked positions the diffusion loss sees: all, or per sample a random subset.

        ``model.diffusion.reconstruction_ratio`` < 1: each sample keeps round(ratio * N_mask)
        (at least 1) of its masked tokens, drawn from its ``diffusion_subset`` stream and kept
        in ascending order; (B, N_mask) -> (B, N_keep). At 1 nothing is drawn.
        """
        ratio = self.cfg.diffusion.reconstruction_ratio
        if self.recon != "diffusion" or ratio >= 1.0:
            return masked_idx
        m = masked_idx.shape[1]
        keep = max(1, round(ratio * m))
        scores = rng.rand("diffusion_subset", m)  # (B, N_mask): a random permutation per sample
        chosen = scores.argsort(dim=1)[:, :keep].sort(dim=1).values.to(masked_idx.device)
        return masked_idx.gather(1, chosen)

    def recon_loss(self, z, target, rng: SampleRNG) -> dict:
        if self.recon == "linear":
            return {"loss_recon": F.mse_loss(self.recon_head(z), target.to(z.dtype))}
        b, m, c = target.shape
        mul = self.diffloss.batch_mul
        t = rng.randint("diffusion_t", self.diffloss.diffusion.num_timesteps, mul, m)  # (B, mul, M)
        # Rows sample-major (b, repeat, token); eps of row r comes from Philox(seeds[r]).
        seeds = row_seeds(rng.stream_seeds("diffusion_noise"), mul * m)
        rows = lambda x: x.unsqueeze(1).expand(b, mul, *x.shape[1:]).reshape(-1, x.shape[-1])  # noqa: E731
        out = self.diffloss.loss_given_seeds(rows(z), rows(target.to(z.dtype)), t.reshape(-1), seeds)
        return {"loss_recon": out["loss"], **{f"diff_{k}": v.detach() for k, v in out.items() if k != "loss"}}

    # -- the step -----------------------------------------------------------------------

    def forward(self, video, visible_idx, masked_idx, teacher_layers, teacher_pooled, sample_seeds):
        """All Stage-1 losses for one batch; ``loss`` is their weighted sum.

        video (B, C, T, H, W) normalised; visible_idx / masked_idx (B, N_vis) / (B, N_mask)
        sorted; teacher_layers (K, B, N_vis, W): the teacher's l2-normalised layers at the
        visible tokens (:func:`visible_teacher_layers`); teacher_pooled (B*T, W) l2-normalised;
        sample_seeds (B,) int64: per-sample random streams (see SampleRNG).
        """
        enc = self.encoder(video, visible_idx)
        loss_layers, loss_final = self.align_losses(enc, visible_idx, teacher_layers, teacher_pooled)
        w = self.loss_weights
        out = {"loss_align_layers": loss_layers, "loss_align_final": loss_final}
        total = w[0] * loss_layers + w[1] * loss_final
        if self.recon != "none":
            rng = SampleRNG(sample_seeds.tolist(), video.device)
            recon_idx = self.reconstruction_subset(masked_idx, rng)
            z = predict_masked(self.predictor, self.predictor_pos(), self.mask_token, enc, visible_idx, recon_idx,
                               fused=self.cfg.fused_kernels, lean=self.cfg.lean_mlp)
            target = token_ops.gather_tokens(patchify(video, self.patch, self.tubelet), recon_idx)
            out.update(self.recon_loss(z, target, rng))
            total = total + w[2] * out["loss_recon"]
        out["loss"] = total
        return out


# ----------------------------------------------------------------------------- teacher and masks


def build_teacher(cfg: ModelConfig, num_frames: int) -> SigLIPTeacher:
    """The frozen image teacher, randomly initialised from ``teacher.init_seed`` (same on every rank)."""
    t = cfg.teacher
    del num_frames
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.init_seed)
        teacher = SigLIPTeacher(
            img_size=t.img_size, patch_size=t.patch_size, width=t.width, depth=t.depth, heads=t.heads,
            mlp_dim=t.mlp_dim, return_layers=teacher_return_layers(t.depth, cfg.align.num_layers, t.layer_interval),
        )
    if t.weights:
        report = load_siglip_teacher(teacher, t.weights)
        log.info("teacher weights from %s: %s", t.weights, report.summary())
    teacher.freeze()
    return teacher


@torch.no_grad()
def run_teacher(teacher: SigLIPTeacher, video: torch.Tensor, img_size: int) -> TeacherOutput:
    dtype = next(teacher.parameters()).dtype
    return teacher(prepare_teacher_input(video.float(), img_size).to(dtype))


def visible_teacher_layers(layers: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
    """The teacher layers the alignment loss reads: (K, B*T, L, W) -> (K, B, N_vis, W).

    Frames are b-major, so sample b's tokens are ``layers[:, b*T:(b+1)*T]`` flattened t-major,
    the encoder's token order; ``visible_idx`` (B, N_vis) indexes them. Gathered right after
    the mask is drawn so that the full-token layers are freed before the student forward.
    """
    k, _, _, w = layers.shape
    b, n = visible_idx.shape
    idx = visible_idx.to(layers.device).view(1, b, n, 1).expand(k, b, n, w)
    return layers.reshape(k, b, -1, w).gather(2, idx)


def make_mask(cfg: ModelConfig, rng: SampleRNG, grid: tuple[int, int, int], saliency=None) -> masking.MaskInfo:
    """The step's mask from per-sample noise: semantic (teacher saliency) or random tubes."""
    t, h, w = grid
    generators = rng.generators("mask")
    if cfg.mask_type == "semantic":
        return masking.semantic_mask(saliency, len(rng), t, cfg.mask_ratio, generator=generators)
    return masking.tube_mask(len(rng), t, h * w, cfg.mask_ratio, device=rng.device, generator=generators)


def teacher_step(teacher: SigLIPTeacher, cfg: ModelConfig, grid: tuple[int, int, int], video: torch.Tensor,
                 rng: SampleRNG) -> tuple[masking.MaskInfo, torch.Tensor, torch.Tensor]:
    """The teacher's part of a Stage-1 step: run the teacher, draw the mask (semantic masks
    read its saliency), gather its layers at the visible tokens. Returns (mask, targets
    (K, B, N_vis, W), pooled); the full-token layers are freed on return, before the student runs."""
    tout = run_teacher(teacher, video, cfg.teacher.img_size)
    mask = make_mask(cfg, rng, grid, tout.saliency)
    return mask, visible_teacher_layers(tout.layers, mask.visible_idx), tout.pooled


def build_stage1(cfg: Config) -> Stage1Model:
    model = Stage1Model(cfg.model, cfg.data.num_frames, cfg.data.img_size)
    if (not chunking_allowed(cfg.deepspeed.zero_stage) and getattr(model, "diffloss", None) is not None
            and model.diffloss.chunk_rows):
        log.info("model.diffusion.chunk_rows=%d: off under deepspeed.zero_stage %d (plain autograd for the head)",
                 model.diffloss.chunk_rows, cfg.deepspeed.zero_stage)
        model.diffloss.chunk_rows = 0
    return model
