"""The video ViT encoder, run on the visible (unmasked) tokens only.

Token order everywhere: t-major, then rows, then columns: token ``n = ti*h*w + y*w + x``, the
row order of the position tables. Patches are gathered at the visible tokens *before* the
patch embedding (RMSNorm -> Linear -> RMSNorm acts per token, so the values are those of
embedding every patch and gathering after), so masked patches are never embedded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, NamedTuple, Sequence

import torch
import torch.nn as nn

from ivfast.models.layers import BLOCK_STYLES, Block, LayerScale, RMSNorm
from ivfast.models.pos_embed import PositionTable
from ivfast.ops.token_gather import add_pos_at, gather_tokens


@dataclass
class EncoderConfig:
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    block: Literal["release", "plain"] = "release"
    num_cls_tokens: int = 4
    layer_scale_init: float = 1e-5
    drop_path: float = 0.1
    patch_size: int = 14
    tubelet_size: int = 1
    pos_learnable: bool = True
    gelu: Literal["tanh", "erf"] = "tanh"  # the blocks' MLP activation; tanh: the release's fused MLP


def patchify(video: torch.Tensor, patch: int, tubelet: int = 1) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, C*tubelet*patch*patch), tokens t-major, then rows, then columns;
    each token's values ordered (c, tt, py, px): a Conv3d kernel reshaped to (D, -1) is the same
    projection, and for tubelet 1 this is ``pixel_unshuffle``'s channel order."""
    b, c, t, h, w = video.shape
    if t % tubelet or h % patch or w % patch:
        raise ValueError(f"video {tuple(video.shape)} is not divisible into {tubelet}x{patch}x{patch} tubelets")
    gt, gh, gw = t // tubelet, h // patch, w // patch
    x = video.reshape(b, c, gt, tubelet, gh, patch, gw, patch)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # b, gt, gh, gw, c, tt, py, px
    return x.reshape(b, gt * gh * gw, c * tubelet * patch * patch)


def encoder_kwargs(cfg: EncoderConfig, *, num_frames: int, img_size: int) -> dict:
    """:class:`VideoEncoder`'s constructor arguments for ``cfg`` (no ``return_layers``): plain
    values, as an export writes them to its ``encoder.yaml``."""
    return dict(img_size=img_size, patch_size=cfg.patch_size, num_frames=num_frames, tubelet_size=cfg.tubelet_size,
                in_chans=3, width=cfg.width, depth=cfg.depth, heads=cfg.heads, mlp_ratio=float(cfg.mlp_ratio),
                block=cfg.block, num_cls_tokens=cfg.num_cls_tokens, layer_scale_init=float(cfg.layer_scale_init),
                drop_path=float(cfg.drop_path), pos_learnable=cfg.pos_learnable, gelu=cfg.gelu)


class PatchEmbed(nn.Module):
    """A Linear over flattened tubelets; ``norms`` (release style): RMSNorm on the tubelet before
    and on the embedding after."""

    def __init__(self, patch_size: int, tubelet_size: int, in_chans: int, width: int, norms: bool):
        super().__init__()
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        self.patch_dim = in_chans * tubelet_size * patch_size * patch_size
        self.norm_in = RMSNorm(self.patch_dim) if norms else nn.Identity()
        self.proj = nn.Linear(self.patch_dim, width)
        self.norm_out = RMSNorm(width) if norms else nn.Identity()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, patch_dim) from :func:`patchify` -> (B, N, width)."""
        return self.norm_out(self.proj(self.norm_in(patches)))


class EncoderOutput(NamedTuple):
    """``tokens``: (B, num_cls + N_vis, D) last-block output (no final norm); ``layers``: one such
    tensor per requested block, ascending; ``num_cls``: leading CLS rows. A NamedTuple so that
    DeepSpeed ZeRO-3's module hooks see its tensors."""

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

    Parameter names: norms contain ``norm``, the position table is ``pos.table``, the CLS tokens
    ``cls_token``, biases end in ``bias`` (the optimiser's no-decay rules read them).
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
        gelu: str = "erf",
        return_layers: Sequence[int] = (),
    ):
        super().__init__()
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
            Block(width, heads, mlp_ratio, style=block, drop_path=r, layer_scale_init=layer_scale_init, gelu=gelu)
            for r in rates
        )
        self.init_weights()

    @classmethod
    def from_config(cls, cfg: EncoderConfig, *, num_frames: int, img_size: int, return_layers: Sequence[int] = (),
                    drop_path: float | None = None) -> "VideoEncoder":
        kwargs = encoder_kwargs(cfg, num_frames=num_frames, img_size=img_size)
        if drop_path is not None:
            kwargs["drop_path"] = float(drop_path)
        return cls(**kwargs, return_layers=return_layers)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Linear weights and CLS tokens trunc-normal(0.02), biases zero, norms one, LayerScale at its
        init value, position table back to sincos (CLS rows zero)."""
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

    def patchify(self, video: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, N, patch_dim) in this encoder's tubelet layout."""
        if video.ndim != 5 or video.shape[1] != self.in_chans:
            raise ValueError(f"video must be (B, {self.in_chans}, T, H, W), got {tuple(video.shape)}")
        return patchify(video, self.patch_size, self.tubelet_size)

    def token_grid(self, video_shape: Sequence[int]) -> tuple[int, int, int]:
        """The (t, h, w) token grid of a (B, C, T, H, W) video."""
        _, _, t, h, w = video_shape
        return t // self.tubelet_size, h // self.patch_size, w // self.patch_size

    def embed(self, patches: torch.Tensor, grid: tuple[int, int, int],
              visible_idx: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks' input (B, num_cls + N_vis, D) = [CLS + pos_cls | embed(patches[visible]) + pos]."""
        if visible_idx is None:
            x = self.patch_embed(patches)
            x = x + self.pos.patch_rows_for(*grid).to(x.dtype)
        else:
            if visible_idx.ndim != 2 or visible_idx.shape[0] != patches.shape[0]:
                raise ValueError(f"visible_idx must be (B, N_vis), got {tuple(visible_idx.shape)}")
            x = self.patch_embed(gather_tokens(patches, visible_idx))
            if self.pos.learnable:
                x = add_pos_at(x, visible_idx, pos=self.pos.patch_rows_for(*grid))
            else:  # the fixed sine-cosine, computed in the kernel from the token index
                x = add_pos_at(x, visible_idx, grid=grid)
        if self.cls_token is not None:
            cls = (self.cls_token + self.pos.cls).to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        return x

    def forward(self, x: torch.Tensor, visible_idx: torch.Tensor | None = None,
                grid: tuple[int, int, int] | None = None) -> EncoderOutput:
        """x: a video (B, C, T, H, W), or its :meth:`patchify` output (B, N, patch_dim) with the
        clip's token ``grid``; visible_idx (B, N_vis) int64 sorted ascending, or None for all."""
        if x.dim() == 3:
            if grid is None:
                raise ValueError("patches (B, N, patch_dim) need their token grid (t, h, w)")
            patches = x
        else:
            patches, grid = self.patchify(x), self.token_grid(x.shape)
        x = self.embed(patches, grid, visible_idx)
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.return_layers:
                outs.append(x)
        return EncoderOutput(tokens=x, layers=outs, num_cls=self.num_cls)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, width={self.width}, depth={self.depth}, block={self.block_style!r}, num_cls={self.num_cls}"
