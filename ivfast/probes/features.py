"""The frozen backbone of a probe: selection and loading (:func:`load_backbone`,
:func:`load_encoder`), token extraction with the clips fitted to the backbone
(:class:`FrozenBackbone`) and an on-disk feature cache (:class:`FeatureCache`)."""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ivfast.probes.config import BackboneConfig, resolve_backbone


class BackboneMismatch(ValueError):
    """Clips that do not fit the backbone; the message is one line naming both sides."""


def load_backbone(b: BackboneConfig) -> tuple[nn.Module, dict]:
    """``(encoder, info)``: the ``VideoEncoder`` ``b`` selects (:func:`resolve_backbone`; eval
    mode, drop-path off) and what it is: ``source``, ``path`` (export directory or checkpoint,
    absolute; empty for ``random``), ``run_config`` (checkpoints), ``format`` (exports),
    ``parameters``, ``architecture`` (the constructor arguments), ``note`` (why ``b.source``
    was set aside, else empty). Building the encoder draws nothing from the global RNG (its random
    init is forked off), so a probe's own draws do not depend on where its backbone was loaded."""
    with torch.random.fork_rng(devices=[]):
        return _load_backbone(b)


def _load_backbone(b: BackboneConfig) -> tuple[nn.Module, dict]:
    from ivfast.export import build_encoder, encoder_kwargs, is_pretrained_dir, run_encoder_state
    from ivfast.models.layers import count_parameters
    from ivfast.models.pretrained import encoder_args_of, encoder_from, read_pretrained

    source, note = resolve_backbone(b)
    info = {"source": source, "path": "", "note": note}
    if source == "export":  # either layout: config.json + model.safetensors, or encoder.yaml + encoder.safetensors
        if not is_pretrained_dir(b.export_dir):
            raise FileNotFoundError(f"backbone.export_dir {b.export_dir!r} holds no encoder export (config.json + "
                                    "model.safetensors, or encoder.yaml + encoder.safetensors): run ivfast-export")
        pre = read_pretrained(b.export_dir)
        enc = encoder_from(pre, drop_path=0.0)  # names each key or shape that does not fit
        info.update(path=os.path.abspath(b.export_dir), format=pre.format)
        if pre.mean and pre.std:
            info.update(mean=list(pre.mean), std=list(pre.std))
    elif source == "checkpoint":
        from ivfast.checkpoint_io import find_run_dir, load_model_state
        from ivfast.config import load_config

        run_config = b.run_config
        if not run_config:
            run_dir = find_run_dir(b.checkpoint)
            if run_dir is None:
                raise FileNotFoundError(f"no config.yaml found for backbone.checkpoint {b.checkpoint!r}; "
                                        "set backbone.run_config")
            run_config = os.path.join(run_dir, "config.yaml")
        cfg = load_config(run_config)
        kwargs = encoder_kwargs(cfg)
        kwargs["drop_path"] = 0.0
        enc = build_encoder(kwargs, run_encoder_state(cfg, load_model_state(b.checkpoint))[0])
        info.update(path=os.path.abspath(b.checkpoint), run_config=os.path.abspath(run_config))
    else:
        torch.manual_seed(b.random_seed)  # inside load_backbone's fork of the RNG
        enc = build_encoder(dict(img_size=b.random_img_size, patch_size=b.random_patch,
                                 num_frames=b.random_frames, width=b.random_width, depth=b.random_depth,
                                 heads=b.random_heads, drop_path=0.0, num_cls_tokens=1, pos_learnable=False))
        info["seed"] = b.random_seed
    if "mean" not in info:  # what ivfast trains with (ivfast-export records it)
        from ivfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        info.update(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    enc.adapt_clips = bool(b.adapt_clips)  # read by FrozenBackbone
    info["parameters"] = count_parameters(enc)
    info["architecture"] = encoder_args_of(enc)
    return enc.eval(), info


def load_encoder(b: BackboneConfig):
    """The ``VideoEncoder`` named by ``b`` (eval mode, drop-path off): :func:`load_backbone`'s encoder."""
    return load_backbone(b)[0]


def describe_backbone(info: dict, layer: int = -1) -> list[str]:
    """The log lines saying which backbone is probed (from :func:`load_backbone`'s ``info``)."""
    a = info["architecture"]
    where = {"export": f"export {info['path']} ({info.get('format', '')})",
             "checkpoint": f"checkpoint {info['path']} (run config {info.get('run_config', '')})",
             "random": f"random encoder (seed {info.get('seed', 0)}): chance-level features, no trained weights"}
    depth = int(a["depth"])
    block = layer + depth if layer < 0 else layer
    lines = [f"backbone: {where[info['source']]}"]
    if info.get("note"):
        lines.append(f"backbone: note: {info['note']}")
    lines.append(f"backbone: {info['parameters']:,} parameters, VideoEncoder width {a['width']}, depth {depth}, "
                 f"heads {a['heads']}, {a['num_frames']} frames x {a['img_size']} px, tubelet {a['tubelet_size']} x "
                 f"patch {a['patch_size']}, {a['num_cls_tokens']} CLS, "
                 f"{'learnable' if a['pos_learnable'] else 'sine-cosine'} position table, {a['block']} blocks; "
                 f"probing block {block + 1} of {depth}")
    return lines


class FrozenBackbone(nn.Module):
    """``forward(video (B, 3, T, H, W)) -> tokens (B, N, D)``: patch tokens of block ``layer``
    (a list of blocks: their tokens concatenated along channels in that order, repeats allowed).

    The encoder never trains: its parameters have ``requires_grad=False``, it stays in eval
    mode whatever ``train()`` is called with, and the forward runs under ``no_grad``.

    Clips are fitted to the backbone (:meth:`fit`): with ``adapt`` (default: the encoder's
    ``adapt_clips``, set by :func:`load_backbone`, else True) a clip whose frames differ from
    the backbone's ``img_size`` is resized to it (bilinear, antialiased when shrinking), and a
    clip length other than the backbone's resamples the position table in time; a length that
    is not a multiple of the tubelet, or any difference without ``adapt``, raises
    :class:`BackboneMismatch`. :meth:`grid` is the token grid of a fitted clip.
    """

    def __init__(self, encoder, layer: int | Sequence[int] = -1, adapt: bool | None = None):
        super().__init__()
        depth = encoder.depth
        idx = [i + depth if i < 0 else i for i in ([layer] if isinstance(layer, int) else layer)]
        if not idx or any(not 0 <= i < depth for i in idx):
            raise ValueError(f"backbone.layer {layer} out of range for an encoder of depth {depth}")
        encoder.return_layers = tuple(sorted(set(idx)))
        self.layers = [encoder.return_layers.index(i) for i in idx]  # places in the encoder's output layers
        self.encoder = encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.width, self.patch_size, self.tubelet = encoder.width, encoder.patch_size, encoder.tubelet_size
        self.adapt = bool(getattr(encoder, "adapt_clips", True)) if adapt is None else bool(adapt)
        t, h, _ = encoder.grid
        self.img_size, self.num_frames = h * self.patch_size, t * self.tubelet
        # A learnable table is resampled from its own rows for every clip length, never from a resampled one.
        pos = encoder.pos
        self.register_buffer("pos_rows", pos.table.detach().clone() if pos.learnable else None, persistent=False)
        self.pos_grid = tuple(pos.grid)

    def train(self, mode: bool = True):  # noqa: D401 - always eval
        super().train(False)
        return self

    def fit(self, t: int, h: int, w: int, what: str = "clips") -> list[str]:
        """How clips of ``t`` frames x ``h`` x ``w`` px are fitted to the backbone: notes (empty when
        they fit as they are), or :class:`BackboneMismatch` naming both sides (``what``: the clips'
        side, e.g. ``"classify clips (classify.num_frames=5, classify.img_size=32)"``)."""
        s, tub = self.img_size, self.tubelet
        theirs = (f"the backbone ({self.num_frames} frames x {s}x{s} px, tubelet {tub} x patch "
                  f"{self.patch_size})")
        mine = f"{what}: {t} frames x {h}x{w} px"
        if t < tub or t % tub:
            raise BackboneMismatch(f"{mine} do not fit {theirs}: {t} frames is not a multiple of the tubelet {tub}")
        notes = []
        if (h, w) != (s, s):
            if not self.adapt:
                raise BackboneMismatch(f"{mine} do not fit {theirs}: the frame size differs "
                                       "(backbone.adapt_clips=false)")
            notes.append(f"{mine} resized to {s}x{s} px, the backbone's img_size")
        if t != self.num_frames:
            if not self.adapt:
                raise BackboneMismatch(f"{mine} do not fit {theirs}: the frame count differs "
                                       "(backbone.adapt_clips=false)")
            notes.append(f"{mine}: the backbone's position table resampled in time, {self.num_frames // tub} -> "
                         f"{t // tub} time steps")
        return notes

    def grid(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """The token grid of clips of ``t`` x ``h`` x ``w`` once fitted (:meth:`fit`)."""
        self.fit(t, h, w)
        side = self.img_size // self.patch_size
        return t // self.tubelet, side, side

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.tokens(video)[1]

    @torch.no_grad()
    def tokens(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cls (B, num_cls, D), patch (B, N, D))`` tokens of block ``layer`` (float32; several
        blocks concatenated along channels), clips fitted."""
        b, c, t, h, w = video.shape
        self.fit(t, h, w)
        s = self.img_size
        if (h, w) != (s, s):
            x = video.transpose(1, 2).reshape(b * t, c, h, w).float()
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=s < min(h, w))
            video = x.reshape(b, t, c, s, s).transpose(1, 2)
        tt = t // self.tubelet
        pos = self.encoder.pos
        if tt != pos.grid[0]:
            if self.pos_rows is not None:
                pos.table, pos.grid = nn.Parameter(self.pos_rows.clone(), requires_grad=False), self.pos_grid
            pos.resize_time(tt)
            pos.requires_grad_(False)
        out = self.encoder(video.to(next(self.encoder.parameters()).dtype))
        parts = [out.layers[j].float() for j in self.layers]
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return x[:, :out.num_cls], x[:, out.num_cls:]

    @torch.no_grad()
    def extract(self, video: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Tokens of a large batch, ``batch_size`` clips at a time."""
        return torch.cat([self(video[i:i + batch_size]) for i in range(0, video.shape[0], batch_size)])


class FeatureCache:
    """Token features on disk: ``ROOT/<split>/<index:08d>.safetensors`` (key ``tokens``).

    A cached sample is never recomputed, so only deterministic inputs (eval splits, training
    without random augmentation) may be cached.
    """

    def __init__(self, root: str, split: str):
        self.dir = os.path.join(root, split)
        os.makedirs(self.dir, exist_ok=True)

    def path(self, index: int) -> str:
        return os.path.join(self.dir, f"{int(index):08d}.safetensors")

    def get(self, index: int) -> torch.Tensor | None:
        p = self.path(index)
        if not os.path.isfile(p):
            return None
        from safetensors.torch import load_file

        return load_file(p)["tokens"]

    def put(self, index: int, tokens: torch.Tensor) -> None:
        from ivfast.files import save_safetensors

        save_safetensors({"tokens": tokens}, self.path(index))


def tokens_for(backbone: FrozenBackbone, video: torch.Tensor, index: torch.Tensor, cache: FeatureCache | None,
               device: torch.device) -> torch.Tensor:
    """Tokens of a batch: read from ``cache`` where present, the rest computed (and stored)."""
    if cache is None:
        return backbone(video.to(device))
    got = [cache.get(int(i)) for i in index]
    missing = [j for j, g in enumerate(got) if g is None]
    if missing:
        fresh = backbone(video[missing].to(device)).cpu()
        for j, tok in zip(missing, fresh):
            cache.put(int(index[j]), tok)
            got[j] = tok
    return torch.stack(got).to(device)
