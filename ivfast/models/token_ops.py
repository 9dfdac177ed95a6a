"""Reference implementations of the token movements around masking.

These are the plain PyTorch versions of what ``kernels/`` fuses: the masked-token gather
with the position embedding added, and its inverse for the predictor input. Index
tensors are (B, M) int64, sorted ascending within each row.
"""
from __future__ import annotations

import torch


class _GatherTokens(torch.autograd.Function):
    """``torch.gather`` over dim 1 that keeps only the index for backward (autograd's gather
    also keeps its whole input, for its shape)."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.shape = x.shape
        return torch.gather(x, 1, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).scatter_add_(1, index, grad), None


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, lean: bool = False) -> torch.Tensor:
    """x (B, N, D), idx (B, M) -> (B, M, D) with out[b, m] = x[b, idx[b, m]].

    ``lean``: backward keeps only ``idx`` (same values and gradient), not ``x``."""
    index = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    if lean and x.requires_grad and torch.is_grad_enabled():
        return _GatherTokens.apply(x, index)
    return torch.gather(x, 1, index)


def add_pos_and_gather(x: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(x + pos)[b, idx[b]]: x (B, N, D) patch tokens, pos (N, D) position table."""
    return gather_tokens(x, idx) + pos[idx]


def scatter_with_mask_token(
    visible: torch.Tensor, idx: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """The predictor input: (B, N, D) with ``visible`` at ``idx``, ``mask_token`` elsewhere, plus ``pos``.

    visible (B, M, D), idx (B, M), mask_token (D,), pos (N, D).
    """
    b, _, d = visible.shape
    n = pos.shape[0]
    full = mask_token.to(visible.dtype).expand(b, n, d).clone()
    full = full.scatter(1, idx.unsqueeze(-1).expand(-1, -1, d), visible)
    return full + pos.to(visible.dtype)
