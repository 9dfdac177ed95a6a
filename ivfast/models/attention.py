"""The one attention entry point used by the encoder, teacher, predictor and heads.

Backends beyond torch SDPA (flash-attn, FlexAttention) plug in here; every caller goes
through :func:`attention` so that a backend change is one place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def window_mask(n: int, window: int, device) -> torch.Tensor:
    """Boolean (n, n) mask, True where query i may attend key j: |i - j| <= window."""
    idx = torch.arange(n, device=device)
    return (idx[:, None] - idx[None, :]).abs() <= window


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None) -> torch.Tensor:
    """Scaled dot-product attention over (B, H, N, Dh) tensors.

    ``window``: if given, a sliding window: query i sees keys j with |i - j| <= window
    (ModernBERT's local attention of 128 tokens is ``window=64``).
    """
    mask = None
    if window is not None and window < max(q.shape[-2], k.shape[-2]):
        if q.shape[-2] != k.shape[-2]:
            raise ValueError("windowed attention needs as many queries as keys")
        mask = window_mask(q.shape[-2], window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
