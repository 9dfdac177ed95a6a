"""Stage 1's trainable model: encoder, alignment heads, predictor and reconstruction head.

``recon`` picks the paper's three memory-table rows: ``none`` (Align only), ``linear`` (Align +
Linear Recon), ``diffusion`` (Align + Diffusion Recon). The frozen teacher, the mask and every
random draw live outside (``ivfast.training.step``): the forward takes plain tensors.

    video -> patches -> encoder(visible tokens) -> per-layer heads vs teacher layers (visible tokens)
                                                -> attention pool -> final head vs teacher pooled
                                                -> predictor(encoder tokens + mask tokens)
                                                   -> at recon_idx: linear MSE or diffusion loss on patches
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ivfast.models.diffloss import DiffusionConfig, DiffusionLoss
from ivfast.models.encoder import EncoderConfig, VideoEncoder
from ivfast.models.heads import AttentionPool, MLPHead, cosine_align_loss
from ivfast.models.pos_embed import PositionTable
from ivfast.models.predictor import Predictor, PredictorConfig, predict_masked
from ivfast.ops.token_gather import gather_tokens


@dataclass
class AlignConfig:
    num_layers: int = 6
    head_hidden: int = 0
    pool_heads: int = 16
    pool_dim: int = 768


@dataclass
class Stage1Config:
    num_frames: int = 16
    img_size: int = 224
    recon: Literal["none", "linear", "diffusion"] = "diffusion"
    loss_weights: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    teacher_width: int = 1536
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)


def student_return_layers(depth: int, k: int) -> list[int]:
    """The last ``k`` encoder blocks, ascending (the release's interval of 1)."""
    return list(range(depth - k, depth))


class Stage1Model(nn.Module):
    def __init__(self, cfg: Stage1Config):
        super().__init__()
        e, a, p = cfg.encoder, cfg.align, cfg.predictor
        self.cfg = cfg
        self.recon = cfg.recon
        self.loss_weights = list(cfg.loss_weights)
        self.encoder = VideoEncoder.from_config(e, num_frames=cfg.num_frames, img_size=cfg.img_size,
                                                return_layers=student_return_layers(e.depth, a.num_layers))
        grid = self.encoder.grid
        self.align_pos = PositionTable(e.width, *grid, num_cls=0, learnable=e.pos_learnable)
        self.align_heads = nn.ModuleList(
            MLPHead(e.width, cfg.teacher_width, hidden=a.head_hidden or None, l2=True) for _ in range(a.num_layers)
        )
        self.pool = AttentionPool(e.width, a.pool_heads, a.pool_dim)
        self.final_head = MLPHead(a.pool_dim, cfg.teacher_width, l2=True)

        self.target_dim = 3 * e.tubelet_size * e.patch_size**2
        if self.recon != "none":
            self.mask_token = nn.Parameter(torch.zeros(e.width))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            self.predictor_pos = PositionTable(e.width, *grid, num_cls=e.num_cls_tokens, learnable=e.pos_learnable)
            self.predictor = Predictor.from_config(p, e.width)
        if self.recon == "linear":
            self.recon_head = nn.Linear(p.width, self.target_dim)
        elif self.recon == "diffusion":
            self.diffloss = DiffusionLoss.from_config(cfg.diffusion, self.target_dim, p.width)

    @property
    def loss_names(self) -> list[str]:
        """The keys :meth:`forward` returns, in a fixed order (every rank agrees on it)."""
        names = ["loss", "loss_align_layers", "loss_align_final"]
        if self.recon != "none":
            names.append("loss_recon")
        if self.recon == "diffusion":
            names += ["diff_mse"] + (["diff_vb"] if self.diffloss.learn_sigma else [])
        return names

    def align_losses(self, enc, visible_idx, teacher_layers, teacher_pooled):
        """Per-layer alignment at the visible tokens (``teacher_layers`` (K, B, N_vis, W)) and the
        final pooled alignment (``teacher_pooled`` (B*T, W), averaged over frames)."""
        b = visible_idx.shape[0]
        if teacher_layers.shape[1:3] != visible_idx.shape:
            raise ValueError(f"teacher_layers must be (K, B, N_vis, W) for visible_idx {tuple(visible_idx.shape)}, "
                             f"got {tuple(teacher_layers.shape)}")
        pos = self.align_pos()[visible_idx]  # (B, N_vis, D)
        tw = teacher_layers.shape[-1]
        layer_losses = []
        for i, head in enumerate(self.align_heads):
            pred = head(enc.layers[i][:, enc.num_cls:] + pos)
            layer_losses.append(cosine_align_loss(pred, teacher_layers[i].to(pred.dtype)))
        final_target = teacher_pooled.reshape(b, -1, tw).mean(1)
        final_pred = self.final_head(self.pool(enc.tokens))
        return torch.stack(layer_losses).mean(), cosine_align_loss(final_pred, final_target.to(final_pred.dtype))

    def recon_loss(self, z, target, t, seeds) -> dict:
        """z (B, N_rec, width), target (B, N_rec, C); diffusion: t and seeds (B * batch_mul * N_rec,),
        rows sample-major (b, repeat, token)."""
        if self.recon == "linear":
            return {"loss_recon": F.mse_loss(self.recon_head(z), target.to(z.dtype))}
        b, m, _ = target.shape
        mul = self.cfg.diffusion.batch_mul
        rows = lambda x: x.unsqueeze(1).expand(b, mul, *x.shape[1:]).reshape(-1, x.shape[-1])  # noqa: E731
        out = self.diffloss(rows(z), rows(target.to(z.dtype)), t, seeds)
        return {"loss_recon": out["loss"], **{f"diff_{k}": v.detach() for k, v in out.items() if k != "loss"}}

    def forward(self, video, visible_idx, recon_idx, teacher_layers, teacher_pooled, diffusion_t=None,
                diffusion_seeds=None):
        """All Stage-1 losses of one batch; ``loss`` is their weighted sum.

        video (B, C, T, H, W) normalised; visible_idx (B, N_vis) and recon_idx (B, N_rec) sorted
        (the masked tokens the reconstruction sees; None without reconstruction); teacher_layers
        (K, B, N_vis, W) and teacher_pooled (B*T, W) l2-normalised; diffusion_t / diffusion_seeds
        (B * batch_mul * N_rec,) int64 each row's timestep and noise seed.
        """
        patches = self.encoder.patchify(video)
        enc = self.encoder(patches, visible_idx, self.encoder.token_grid(video.shape))
        loss_layers, loss_final = self.align_losses(enc, visible_idx, teacher_layers, teacher_pooled)
        w = self.loss_weights
        out = {"loss_align_layers": loss_layers, "loss_align_final": loss_final}
        total = w[0] * loss_layers + w[1] * loss_final
        if self.recon != "none":
            z = predict_masked(self.predictor, self.predictor_pos(), self.mask_token, enc, visible_idx, recon_idx)
            out.update(self.recon_loss(z, gather_tokens(patches, recon_idx), diffusion_t, diffusion_seeds))
            total = total + w[2] * out["loss_recon"]
        out["loss"] = total
        return out
