"""The frozen backbone of a probe: loading (:func:`load_encoder`), token extraction
(:class:`FrozenBackbone`) and an on-disk feature cache (:class:`FeatureCache`)."""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ivfast.probes.config import BackboneConfig


def load_encoder(b: BackboneConfig):
    """The ``VideoEncoder`` named by ``b`` (eval mode, drop-path off)."""
    from ivfast.export import build_encoder, encoder_kwargs, is_pretrained_dir, load_exported_encoder, run_encoder_state

    if b.source == "export":  # either layout: config.json + model.safetensors, or encoder.yaml + encoder.safetensors
        if not is_pretrained_dir(b.export_dir):
            raise FileNotFoundError(f"backbone.export_dir {b.export_dir!r} holds no encoder export (config.json + "
                                    "model.safetensors, or encoder.yaml + encoder.safetensors): run ivfast-export")
        return load_exported_encoder(b.export_dir, drop_path=0.0)
    if b.source == "checkpoint":
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
        return build_encoder(kwargs, run_encoder_state(cfg, load_model_state(b.checkpoint))[0]).eval()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(b.random_seed)
    try:
        enc = build_encoder(dict(img_size=b.random_img_size, patch_size=b.random_patch, num_frames=b.random_frames,
                                 width=b.random_width, depth=b.random_depth, heads=b.random_heads, drop_path=0.0,
                                 num_cls_tokens=1, pos_learnable=False))
    finally:
        torch.random.set_rng_state(gen_state)
    return enc.eval()


class FrozenBackbone(nn.Module):
    """``forward(video (B, 3, T, H, W)) -> tokens (B, N, D)``: patch tokens of block ``layer``.

    The encoder never trains: its parameters have ``requires_grad=False``, it stays in eval
    mode whatever ``train()`` is called with, and the forward runs under ``no_grad``. A clip
    whose length differs from the encoder's grid resizes the position table in time.
    """

    def __init__(self, encoder, layer: int = -1):
        super().__init__()
        depth = encoder.depth
        idx = layer + depth if layer < 0 else layer
        if not 0 <= idx < depth:
            raise ValueError(f"backbone.layer {layer} out of range for an encoder of depth {depth}")
        encoder.return_layers = (idx,)
        self.encoder = encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.width, self.patch_size, self.tubelet = encoder.width, encoder.patch_size, encoder.tubelet_size

    def train(self, mode: bool = True):  # noqa: D401 - always eval
        super().train(False)
        return self

    def grid(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        return t // self.tubelet, h // self.patch_size, w // self.patch_size

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        t = video.shape[2] // self.tubelet
        if t != self.encoder.pos.grid[0]:
            self.encoder.pos.resize_time(t)
            self.encoder.pos.requires_grad_(False)
        out = self.encoder(video.to(next(self.encoder.parameters()).dtype))
        return out.layers[0][:, out.num_cls:].float()

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
        from ivfast.checkpoint_io import save_safetensors

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
