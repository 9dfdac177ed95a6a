"""Stage 2: latent prediction against a frozen (or EMA) copy of the Stage-1 encoder.

    teacher(full clip, no grad) -> last-block patch tokens -> l2                = target
    per multi-block view: encoder(visible tokens) -> predictor(+ mask tokens)
                          -> at masked positions: head -> l2 -> mean(2 - 2 cos) vs target
    loss = loss_view0 + loss_view1

The student (``encoder``, ``predictor``, ``predictor_pos``, ``mask_token``) has the Stage-1
model's parameter names, so a Stage-1 state dict loads by name (:meth:`Stage2Model.load_stage1`);
``head`` (Linear-GELU-Linear-LayerNorm, then l2, the release's Stage-2 decoder) is new. The
teacher is part of the module (an EMA teacher is checkpointed with the run); it never needs a
gradient, has no drop-path and stays in eval mode.

Learnable position tables (``encoder.pos``, ``teacher.pos``, ``predictor_pos``) of a Stage-1 run
with another frame count (16 -> 32 in the paper), :attr:`Stage2ModelConfig.pos_resample`:

- ``"per_forward"`` (the release): the tables keep the Stage-1 time rows
  (:attr:`Stage2ModelConfig.pos_frames`) as their parameters, and every forward resamples them
  linearly to the clip's frames with ``align_corners=False`` (``F.interpolate``'s default, the
  release's ``expand_pos_embed``); their gradient reaches the stored rows;
- ``"at_load"``: the tables have the clip's frames; :meth:`Stage2Model.load_stage1` resamples the
  checkpoint's rows once (``align_corners=True``: the first and last frames keep their rows).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ivfast.models.encoder import EncoderConfig, VideoEncoder
from ivfast.models.heads import MLPHead, cosine_align_loss
from ivfast.models.pos_embed import PositionTable, resample_table, table_time_rows
from ivfast.models.predictor import Predictor, PredictorConfig, predict_masked
from ivfast.models.weights import LoadReport
from ivfast.ops.token_gather import gather_tokens

log = logging.getLogger("ivfast.stage2")

# Stage-1 parameters that Stage 2 does not use: alignment heads and pooling, reconstruction heads.
STAGE1_ONLY_PREFIXES = ("align_pos.", "align_heads.", "pool.", "final_head.", "diffloss.", "recon_head.")
# What Stage 2 takes from a Stage-1 state dict.
STUDENT_PREFIXES = ("encoder.", "predictor.", "predictor_pos.")
STUDENT_KEYS = ("mask_token",)
POS_RESAMPLES = ("per_forward", "at_load")


@dataclass
class Stage2ModelConfig:
    num_frames: int = 32
    img_size: int = 224
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    # Learnable position tables, see the module docstring: "per_forward" keeps ``pos_frames`` time
    # rows (the Stage-1 checkpoint's; 0: the clip's, num_frames // tubelet) and resamples them in
    # every forward; "at_load" keeps the clip's and load_stage1 resamples the checkpoint's once.
    pos_resample: Literal["per_forward", "at_load"] = "per_forward"
    pos_frames: int = 0


class Stage2Model(nn.Module):
    """Student encoder + predictor + head, and the teacher (a frozen copy of the encoder)."""

    def __init__(self, cfg: Stage2ModelConfig):
        super().__init__()
        e, p = cfg.encoder, cfg.predictor
        self.cfg = cfg
        self.encoder = VideoEncoder.from_config(e, num_frames=cfg.num_frames, img_size=cfg.img_size)
        grid = self.encoder.grid
        pos_t = _stored_time_rows(cfg, grid[0])
        self.mask_token = nn.Parameter(torch.zeros(e.width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.predictor_pos = PositionTable(e.width, *grid, num_cls=e.num_cls_tokens, learnable=e.pos_learnable)
        self.predictor = Predictor.from_config(p, e.width)
        self.head = MLPHead(p.width, e.width, l2=True)
        self.teacher = VideoEncoder.from_config(e, num_frames=cfg.num_frames, img_size=cfg.img_size, drop_path=0.0)
        if cfg.pos_resample == "per_forward":  # draws nothing: every other parameter is as without it
            for table in (self.encoder.pos, self.predictor_pos, self.teacher.pos):
                table.store_time_rows(pos_t)
        self.teacher.requires_grad_(False)
        self.copy_encoder_to_teacher()
        self.teacher.eval()

    @property
    def pos_tables(self) -> dict[str, PositionTable]:
        """The student's position tables by state-dict key (the teacher's follows the encoder's)."""
        return {"encoder.pos.table": self.encoder.pos, "predictor_pos.table": self.predictor_pos}

    @property
    def loss_names(self) -> list[str]:
        return ["loss", "loss_view0", "loss_view1"]

    def train(self, mode: bool = True) -> "Stage2Model":
        super().train(mode)
        self.teacher.eval()  # the teacher never trains: no dropout, no drop-path
        return self

    # -- teacher ---------------------------------------------------------------------

    @torch.no_grad()
    def copy_encoder_to_teacher(self) -> None:
        self.teacher.load_state_dict(self.encoder.state_dict())

    def _teacher_student_pairs(self):
        student = dict(self.encoder.named_parameters())
        pairs = []
        for name, tp in self.teacher.named_parameters():
            sp = student[name]
            if tp.shape != sp.shape or tp.numel() == 0:  # a sharded parameter keeps an empty local tensor
                raise RuntimeError(f"an EMA teacher needs whole parameters; {name} is {tuple(tp.shape)} in the "
                                   f"teacher and {tuple(sp.shape)} in the student (sharded?)")
            pairs.append((tp, sp))
        return pairs

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student; nothing when momentum >= 1.

        In the parameters' own dtype (bf16 under bf16 training: an update smaller than bf16's
        resolution is lost, so momenta very close to 1 may leave the teacher unchanged).
        """
        if momentum >= 1.0:
            return
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"teacher momentum must be in [0, 1], got {momentum}")
        pairs = self._teacher_student_pairs()
        for tp, sp in pairs:
            tp.lerp_(sp.detach().to(tp.dtype), 1.0 - momentum)

    @torch.no_grad()
    def teacher_targets(self, patches: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, N, D) l2-normalised last-block patch tokens of the teacher on the full clip."""
        return F.normalize(self.teacher(patches, None, grid).patch_tokens.float(), dim=-1)

    # -- the step --------------------------------------------------------------------

    def view_loss(self, patches, grid, targets, visible_idx, masked_idx) -> torch.Tensor:
        enc = self.encoder(patches, visible_idx, grid)
        pos = self.predictor_pos(grid)  # per_forward: resampled to the clip's frames
        z = predict_masked(self.predictor, pos, self.mask_token, enc, visible_idx, masked_idx)
        pred = self.head(z)  # per token: the head at the masked positions only
        return cosine_align_loss(pred, gather_tokens(targets, masked_idx))

    def forward(self, video, vis0, msk0, vis1, msk1) -> dict:
        """Both views' losses; ``loss`` is their sum. video (B, C, T, H, W) normalised; vis*/msk*
        (B, N_vis) / (B, N_mask) sorted index tensors of view 0 and view 1."""
        patches = self.encoder.patchify(video)
        grid = self.encoder.token_grid(video.shape)
        targets = self.teacher_targets(patches, grid)
        l0 = self.view_loss(patches, grid, targets, vis0, msk0)
        l1 = self.view_loss(patches, grid, targets, vis1, msk1)
        return {"loss": l0 + l1, "loss_view0": l0.detach(), "loss_view1": l1.detach()}

    # -- initialisation from Stage 1 -------------------------------------------------

    @torch.no_grad()
    def load_stage1(self, state_dict: dict, *, align_corners: bool = True) -> LoadReport:
        """Load the student from a Stage-1 state dict and copy its encoder into the teacher.

        Alignment / reconstruction keys are dropped. Learnable position tables
        (``encoder.pos.table``, ``predictor_pos.table``) whose frame count differs from the
        model's: with ``pos_resample="at_load"`` interpolated in time here (``interpolate_time``,
        ``align_corners`` as there); with ``"per_forward"`` the model must already store the
        checkpoint's time rows (``pos_frames``; the forward resamples them), else ValueError.
        Raises ValueError naming the keys when a needed key is missing or a shape does not match.
        """
        own = self.state_dict()
        needed = [k for k in own if k.startswith(STUDENT_PREFIXES) or k in STUDENT_KEYS]
        report = LoadReport(path="state dict", layout="ivfast stage 1", prefix="")
        taken = {}
        for key, value in state_dict.items():
            if key in needed:
                taken[key] = value
            elif key.startswith(STAGE1_ONLY_PREFIXES):
                report.ignored.append(key)
            else:
                report.unexpected.append(key)
        missing = [k for k in needed if k not in taken]
        if missing:
            hint = ""
            if any(k.startswith(("predictor.", "predictor_pos.")) or k == "mask_token" for k in missing):
                hint = (" (a Stage-1 run with model.recon=none has no predictor: Stage 2 needs a Stage-1 "
                        "checkpoint trained with model.recon=linear or diffusion)")
            raise ValueError(f"Stage-1 state dict lacks {len(missing)} key(s) Stage 2 needs{hint}: "
                             f"{_short(missing)}")
        for key, table in self.pos_tables.items():
            if key in taken and taken[key].shape != own[key].shape:
                t_old = _checkpoint_time_rows(taken[key], table, key)
                if self.cfg.pos_resample == "per_forward":
                    raise ValueError(
                        f"{key}: the Stage-1 checkpoint's table has {t_old} time rows, this Stage-2 model stores "
                        f"{table.grid[0]} (Stage2ModelConfig.pos_frames={self.cfg.pos_frames}, 0: the clip's) under "
                        "model.stage2.pos_resample=per_forward; build it with pos_frames="
                        f"{t_old} (ivfast.config.stage2_config reads it from model.stage2.init_checkpoint) "
                        "or use model.stage2.pos_resample=at_load")
                taken[key] = resample_table(taken[key].float(), table.num_cls, table.grid[0], *table.grid[1:],
                                            align_corners=align_corners)
                report.interpolated[key] = (t_old, table.grid[0])
        bad = [f"{k}: checkpoint {tuple(taken[k].shape)} vs model {tuple(own[k].shape)}"
               for k in needed if taken[k].shape != own[k].shape]
        if bad:
            raise ValueError("Stage-1 state dict does not fit the Stage-2 model (check the encoder/predictor "
                             "config against the Stage-1 run's): " + "; ".join(bad[:8])
                             + (f"; ... ({len(bad)} in all)" if len(bad) > 8 else ""))
        for key in needed:
            own[key].copy_(taken[key].to(own[key].dtype))
        self.copy_encoder_to_teacher()
        report.loaded = needed
        report.kept = [k for k in own if k not in needed and not k.startswith("teacher.")]
        if report.unexpected:
            log.warning("load_stage1: ignored %d unexpected key(s): %s", len(report.unexpected),
                        _short(report.unexpected))
        resampled = [f"; {k} resampled {t.grid[0]} -> {self.encoder.grid[0]} frames in every forward"
                     for k, t in self.pos_tables.items() if t.resample_time and t.grid[0] != self.encoder.grid[0]]
        log.info("load_stage1: %d student tensors loaded, %d Stage-1-only dropped, new: %s%s%s", len(needed),
                 len(report.ignored), _short(report.kept),
                 "".join(f"; {k} interpolated {a} -> {b} frames" for k, (a, b) in report.interpolated.items()),
                 "".join(resampled))
        return report


def _short(keys: list, n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _stored_time_rows(cfg: Stage2ModelConfig, clip_t: int) -> int:
    """The time rows the learnable tables store (checked against ``pos_resample``)."""
    if cfg.pos_resample not in POS_RESAMPLES:
        raise ValueError(f"pos_resample must be one of {POS_RESAMPLES}, got {cfg.pos_resample!r}")
    if cfg.pos_frames < 0:
        raise ValueError(f"pos_frames must be >= 0 (0: the clip's {clip_t} time rows), got {cfg.pos_frames}")
    if cfg.pos_resample == "at_load" and cfg.pos_frames not in (0, clip_t):
        raise ValueError(f"pos_frames={cfg.pos_frames} needs pos_resample='per_forward': under 'at_load' the "
                         f"tables have the clip's {clip_t} time rows")
    return cfg.pos_frames or clip_t


def _checkpoint_time_rows(value: torch.Tensor, table: PositionTable, key: str) -> int:
    """The time rows of a checkpoint position table (num_cls + t*h*w, D) for ``table``'s h, w, D."""
    _, h, w = table.grid
    try:
        return table_time_rows(value.shape, table.num_cls, h * w, table.dim)
    except ValueError:
        raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} cannot be a position table for "
                         f"{table.num_cls} CLS rows + t x {h} x {w} patches of width {table.dim} "
                         "(only the frame count may differ between Stage 1 and Stage 2)") from None
