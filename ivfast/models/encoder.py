"""The video ViT encoder, run on the visible (unmasked) tokens only.

Token order everywhere: t-major, then rows (y), then columns (x):
token ``n = ti*h*w + y*w + x``, the row order of :func:`ivfast.models.pos_embed.sincos_3d`.
"""
from __future__ import annotations

from typing import List, NamedTuple, Sequence

import torch
import torch.nn as nn

from ivfast.models.checkpointing import run_block
from ivfast.models.layers import BLOCK_STYLES, Block, LayerScale, Mlp, RMSNorm, count_parameters
from ivfast.models.pos_embed import PositionTable
from ivfast.models.token_ops import add_pos_and_gather

__all__ = ["EncoderOutput", "PatchEmbed", "VideoEncoder", "count_parameters", "patchify"]


def patchify(video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, C*tubelet*patch*patch).

    Tokens in t-major, y, x order; each token's values flattened as (c, tt, py, px), the
    layout of a Conv3d weight, so a Conv3d kernel reshaped to (D, -1) is the same projection.
    """
    b, c, t, h, w = video.shape
    if t % tubelet or h % patch or w % patch:
        raise ValueError(f"video {tuple(video.shape)} is not divisible into {tubelet}x{patch}x{patch} tubelets")
    gt, gh, gw = t // tubelet, h // patch, w // patch
    x = video.reshape(b, c, gt, tubelet, gh, patch, gw, patch)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # b, gt, gh, gw, c, tt, py, px
    return x.reshape(b, gt * gh * gw, c * tubelet * patch * patch)


class PatchEmbed(nn.Module):
    """Tubelet embedding: a Linear over flattened tubelets.

    ``norms=True`` (release style): RMSNorm on the flattened tubelet before the projection
    and RMSNorm on its output.
    """

    def __init__(self, patch_size: int, tubelet_size: int, in_chans: int, width: int, norms: bool):
        super().__init__()
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        self.patch_dim = in_chans * tubelet_size * patch_size * patch_size
        self.norm_in = RMSNorm(self.patch_dim) if norms else nn.Identity()
        self.proj = nn.Linear(self.patch_dim, width)
        self.norm_out = RMSNorm(width) if norms else nn.Identity()

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = patchify(video, self.tubelet_size, self.patch_size)
        return self.norm_out(self.proj(self.norm_in(x)))


class EncoderOutput(NamedTuple):
    """``tokens``: (B, num_cls + N_vis, D) last-block output (no final norm).
    ``layers``: one (B, num_cls + N_vis, D) tensor per requested block, ascending block order.
    ``num_cls``: how many leading rows are CLS tokens.

    A NamedTuple (not a dataclass) so that DeepSpeed ZeRO-3's module hooks see its tensors."""

    tokens: torch.Tensor
    layers: List[torch.Tensor] = []
    num_cls: int = 0

    @property
    def patch_tokens(self) -> torch.Tensor:
        return self.tokens[:, self.num_cls:]

    @property
    def cls_tokens(self) -> torch.Tensor:
        return self.tokens[:, : self.num_cls]


class VideoEncoder(nn.Module):
    """Video ViT over tubelet tokens; ``forward(video, visible_idx)`` encodes the visible ones.

    Parameter names for the optimiser's no-decay rules: norms contain ``norm``, the position
    table is ``pos.table``, the CLS tokens are ``cls_token``, biases end in ``bias``.
    ``checkpointing``: recompute each block in backward (``ivfast.models.checkpointing``).
    ``lean_mlp``: the blocks' MLPs and LayerScales save less for backward (``ivfast.models.lean_mlp``;
    same values).
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 14,
        num_frames: int = 16,
        tubelet_size: int = 1,
        in_chans: int = 3,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        block: str = "release",
        num_cls_tokens: int = 4,
        layer_scale_init: float = 1e-5,
        drop_path: float = 0.1,
        pos_learnable: bool = True,
        return_layers: Sequence[int] = (),
        fused: bool = False,
        checkpointing: bool = False,
        lean_mlp: bool = False,
    ):
        super().__init__()
        self.fused = bool(fused)
        self.checkpointing = bool(checkpointing)
        if block not in BLOCK_STYLES:
            raise ValueError(f"block must be one of {BLOCK_STYLES}, got {block!r}")
        if img_size % patch_size or num_frames % tubelet_size:
            raise ValueError(
                f"img_size {img_size} / num_frames {num_frames} not divisible by patch {patch_size} / tubelet {tubelet_size}"
            )
        if num_cls_tokens < 0:
            raise ValueError(f"num_cls_tokens must be >= 0, got {num_cls_tokens}")
        layers = sorted({i + depth if i < 0 else i for i in return_layers})
        if any(not 0 <= i < depth for i in layers):
            raise ValueError(f"return_layers {list(return_layers)} out of range for depth {depth}")

        self.width, self.depth, self.num_cls, self.block_style = width, depth, num_cls_tokens, block
        self.patch_size, self.tubelet_size, self.in_chans = patch_size, tubelet_size, in_chans
        self.grid = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1] * self.grid[2]
        self.return_layers = tuple(layers)
        self.layer_scale_init = layer_scale_init

        self.patch_embed = PatchEmbed(patch_size, tubelet_size, in_chans, width, norms=block == "release")
        self.cls_token = nn.Parameter(torch.zeros(1, num_cls_tokens, width)) if num_cls_tokens else None
        self.pos = PositionTable(width, *self.grid, num_cls=num_cls_tokens, learnable=pos_learnable)
        rates = [drop_path * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, style=block, drop_path=r, layer_scale_init=layer_scale_init) for r in rates
        )
        self.init_weights()
        for module in self.modules():  # RMSNorm of the release block (norms, QK-norm, patch norms)
            if isinstance(module, RMSNorm):
                module.fused = self.fused
            elif isinstance(module, (Mlp, LayerScale)):  # the blocks' MLPs and LayerScales: ivfast.models.lean_mlp
                module.lean = bool(lean_mlp)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Linear weights and CLS tokens trunc-normal(0.02), biases zero, norms one,
        LayerScale at its init value, position table back to sincos (CLS rows zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (RMSNorm, LayerScale, PositionTable)):
                m.reset_parameters()
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def embed(self, video: torch.Tensor, visible_idx: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks' input: (B, num_cls + N_vis, D) = [CLS + pos_cls | gather(patches + pos)]."""
        if video.ndim != 5 or video.shape[1] != self.in_chans:
            raise ValueError(f"video must be (B, {self.in_chans}, T, H, W), got {tuple(video.shape)}")
        x = self.patch_embed(video)  # (B, N, D)
        _, _, t, h, w = video.shape
        pos = self.pos.patch_rows_for(t // self.tubelet_size, h // self.patch_size, w // self.patch_size)
        if visible_idx is None:
            x = x + pos
        else:
            if visible_idx.ndim != 2 or visible_idx.shape[0] != x.shape[0]:
                raise ValueError(f"visible_idx must be (B, N_vis), got {tuple(visible_idx.shape)}")
            x = self._gather(x, pos, visible_idx, (t // self.tubelet_size, h // self.patch_size, w // self.patch_size))
        if self.cls_token is not None:
            cls = (self.cls_token + self.pos.cls).to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        return x

    def _gather(self, x, pos, idx, grid):
        """(x + pos)[idx]: the reference, or the fused kernel (in-kernel sine-cosine for fixed tables)."""
        if not self.fused:
            return add_pos_and_gather(x, pos, idx)
        from kernels.token_gather import add_pos_and_gather as fused_gather

        if isinstance(self.pos.table, nn.Parameter):
            return fused_gather(x, idx, pos=pos)
        return fused_gather(x, idx, grid=grid)

    def forward(self, video: torch.Tensor, visible_idx: torch.Tensor | None = None) -> EncoderOutput:
        """video (B, C, T, H, W); visible_idx (B, N_vis) int64 sorted ascending, or None for all."""
        x = self.embed(video, visible_idx)
        outs = []
        for i, blk in enumerate(self.blocks):
            x = run_block(blk, x, checkpoint=self.checkpointing)
            if i in self.return_layers:
                outs.append(x)
        return EncoderOutput(tokens=x, layers=outs, num_cls=self.num_cls)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, width={self.width}, depth={self.depth}, block={self.block_style!r}, num_cls={self.num_cls}"
