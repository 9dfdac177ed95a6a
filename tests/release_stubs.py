"""Running the authors' InternVideo-Next model files on a CPU, for parity checks only.

The release's ``models/InternVideo_next.py`` imports timm and flash-attn, which do not install
here. :func:`load_release_module` imports it from a checkout under a private package name with
small stand-ins registered in ``sys.modules`` only while it imports (restored afterwards, so no
other code sees them):

- ``timm.models.layers``: ``DropPath`` (identity in eval), ``to_2tuple``, ``trunc_normal_``;
  ``timm.models.registry.register_model`` (returns the function);
- ``flash_attn.modules.mlp.FusedMLP``: Linear ``fc1`` -> tanh-approximate GELU -> Linear ``fc2``
  (flash-attn's default ``gelu_approx``, its parameter names);
- ``flash_attn.ops.rms_norm.DropoutAddRMSNorm``: ``norm(x + residual)`` in float32 times
  ``weight``; with ``prenorm`` also returns the sum (the residual stream), flash-attn's contract;
- the release's own ``flash_attention_class.FlashAttention`` (CUDA and fp16/bf16 only): plain
  softmax attention over packed ``(B, S, 3, H, D)`` qkv, returning ``(B, S, H, D), None``.

With these, the release's fused path (``use_flash_attn = use_fused_rmsnorm = use_fused_mlp =
True``, the published configuration) runs in float32 on the CPU; the unfused path (all False)
needs no stand-in beyond timm's.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

PACKAGE = "ivfast_release_checkout"
RELEASE_ENV = "IVFAST_RELEASE"


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or not self.drop_prob:
            return x
        keep = 1.0 - self.drop_prob
        return x * x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep) / keep


def to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)


def register_model(fn):
    return fn


class FusedMLP(nn.Module):
    """flash-attn's FusedMLP as a plain module: fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, in_features, hidden_features=None, out_features=None, activation="gelu_approx", bias1=True,
                 bias2=True, return_residual=False, checkpoint_lvl=0, heuristic="auto", device=None, dtype=None):
        super().__init__()
        assert activation == "gelu_approx" and not return_residual
        hidden_features = hidden_features or in_features * 4
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias1, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias2, device=device, dtype=dtype)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DropoutAddRMSNorm(nn.Module):
    """flash-attn's DropoutAddRMSNorm (dropout p is 0 in eval): ``s = x + residual``;
    ``out = s * rsqrt(mean(s^2) + eps) * weight`` in float32; returns ``(out, s)`` with ``prenorm``."""

    def __init__(self, hidden_size, prenorm=False, p=0.0, eps=1e-5, residual_in_fp32=False, device=None, dtype=None):
        super().__init__()
        self.prenorm, self.p, self.eps, self.residual_in_fp32 = prenorm, p, eps, residual_in_fp32
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, residual=None):
        x = F.dropout(x, self.p, self.training)
        s = x if residual is None else x + residual
        sf = s.float()
        out = (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)
        if self.residual_in_fp32:
            s = sf
        return (out, s) if self.prenorm else out


class FlashAttention(nn.Module):
    """The release's FlashAttention wrapper as plain softmax attention (no padding masks)."""

    def __init__(self, softmax_scale=None, attention_dropout=0.0, device=None, dtype=None):
        super().__init__()
        self.softmax_scale = softmax_scale
        self.dropout_p = attention_dropout

    def forward(self, qkv, key_padding_mask=None, causal=False, cu_seqlens=None, max_s=None, need_weights=False):
        assert key_padding_mask is None and cu_seqlens is None and not causal and not need_weights
        q, k, v = qkv.unbind(2)  # (B, S, H, D)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        scale = self.softmax_scale or q.shape[-1] ** -0.5
        attn = ((q * scale) @ k.transpose(-2, -1)).softmax(-1)
        return (attn @ v).transpose(1, 2), None


def _stub_modules() -> dict[str, types.ModuleType]:
    def mod(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        return m

    mods = {
        "timm": mod("timm"),
        "timm.models": mod("timm.models"),
        "timm.models.layers": mod("timm.models.layers", DropPath=DropPath, to_2tuple=to_2tuple,
                                  trunc_normal_=trunc_normal_),
        "timm.models.registry": mod("timm.models.registry", register_model=register_model),
        "flash_attn": mod("flash_attn"),
        "flash_attn.modules": mod("flash_attn.modules"),
        "flash_attn.modules.mlp": mod("flash_attn.modules.mlp", FusedMLP=FusedMLP),
        "flash_attn.ops": mod("flash_attn.ops"),
        "flash_attn.ops.rms_norm": mod("flash_attn.ops.rms_norm", DropoutAddRMSNorm=DropoutAddRMSNorm),
    }
    for name in ("timm", "timm.models", "flash_attn", "flash_attn.modules", "flash_attn.ops"):
        mods[name].__path__ = []
    return mods


@contextlib.contextmanager
def stubbed_imports():
    """The stand-ins in ``sys.modules`` for the duration (whatever was there before is put back)."""
    stubs = _stub_modules()
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def release_root() -> str | None:
    """The checkout named by ``IVFAST_RELEASE`` (the InternVideo-Next folder), or None."""
    root = os.environ.get(RELEASE_ENV, "")
    return root or None


def load_release_module(root: str, name: str = "InternVideo_next"):
    """``models/<name>.py`` of the checkout at ``root``, imported as ``ivfast_release_checkout.<name>``
    (the package's ``__init__`` is not run: it imports the training models and transformers)."""
    models = os.path.join(root, "models")
    if not os.path.isfile(os.path.join(models, name + ".py")):
        raise FileNotFoundError(f"{models}/{name}.py not found: {RELEASE_ENV} must name the InternVideo-Next folder")
    full = f"{PACKAGE}.{name}"
    if full in sys.modules:
        return sys.modules[full]
    pkg = sys.modules.get(PACKAGE)
    if pkg is None:
        pkg = types.ModuleType(PACKAGE)
        pkg.__path__ = [models]
        sys.modules[PACKAGE] = pkg
        sys.modules[f"{PACKAGE}.flash_attention_class"] = types.ModuleType(f"{PACKAGE}.flash_attention_class")
        sys.modules[f"{PACKAGE}.flash_attention_class"].FlashAttention = FlashAttention
    with stubbed_imports():
        return importlib.import_module(full)


# The tiny configuration of the fixture and the parity test (the release's InternVideo2 class).
TINY = dict(img_size=56, patch_size=14, num_frames=4, tubelet_size=1, embed_dim=64, depth=2, num_heads=4,
            mlp_ratio=4.0, cls_token_num=4, attn_pool_num_heads=4, clip_embed_dim=32, init_values=0.1,
            drop_path_rate=0.0, qkv_bias=False, qk_normalization=True)


def build_release_encoder(module, *, fused: bool = True, seed: int = 0, **overrides):
    """The release's ``InternVideo2`` at :data:`TINY` (``fused``: the published flash-attn path),
    every parameter redrawn from ``seed`` (norm weights near 1, the rest N(0, 0.02..0.5)), eval mode."""
    import io

    cfg = {**TINY, **overrides}
    with contextlib.redirect_stdout(io.StringIO()):  # the constructor prints its settings
        model = module.InternVideo2(use_flash_attn=fused, use_fused_rmsnorm=fused, use_fused_mlp=fused, **cfg)
    randomize_(model, seed)
    return model.eval()


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> None:
    """Redraw every parameter from ``seed`` so that no mapping error hides behind an init value:
    norm weights and LayerScale gammas 1 + N(0, 0.1) (gammas x 0.3), the position table
    N(0, 0.5), everything else N(0, 0.05)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith("gamma"):
            p.copy_(0.3 * (1.0 + 0.1 * noise))
        elif "pos_embed" in name:
            p.copy_(0.5 * noise)
        else:
            p.copy_(0.05 * noise)


def fixed_clip(seed: int = 1, batch: int = 2, frames: int = 4, size: int = 56) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, frames, size, size, generator=g)
