"""A batch of masks as dense index tensors: every row keeps the same number of visible tokens,
so the encoder runs on a dense (B, N_vis, D) tensor."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def num_reconstructed(masked: int, ratio: float) -> int:
    """Masked tokens per clip the reconstruction loss sees at ``reconstruction_ratio`` ``ratio``:
    all of them at ratio >= 1, else round(ratio * masked), at least 1."""
    return masked if ratio >= 1.0 else max(1, round(ratio * masked))


@dataclass
class MaskInfo:
    """A batch of masks over N tokens.

    mask: (B, N) bool, True = masked. visible_idx: (B, N_vis) int64 and masked_idx:
    (B, N_mask) int64, each sorted ascending within its row; together they partition
    0..N-1 in every row.
    """

    mask: torch.Tensor
    visible_idx: torch.Tensor
    masked_idx: torch.Tensor

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "MaskInfo":
        """Build the index tensors of a (B, N) bool mask (True = masked).

        Every row must have the same number of visible tokens; a ValueError says otherwise.
        """
        if mask.dim() != 2:
            raise ValueError(f"mask must be (B, N), got shape {tuple(mask.shape)}")
        mask = mask.bool()
        n = mask.shape[1]
        n_vis_rows = (~mask).sum(dim=1)
        if mask.shape[0] > 0 and bool((n_vis_rows != n_vis_rows[0]).any()):
            raise ValueError(
                "MaskInfo needs the same number of visible tokens in every row; got per-row "
                f"counts {n_vis_rows.tolist()}"
            )
        n_vis = int(n_vis_rows[0]) if mask.shape[0] > 0 else n
        # A stable sort of 0 (visible) / 1 (masked) puts the visible indices first and keeps
        # both groups in ascending index order.
        order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
        return cls(mask=mask, visible_idx=order[:, :n_vis].contiguous(), masked_idx=order[:, n_vis:].contiguous())

    @property
    def num_visible(self) -> int:
        return self.visible_idx.shape[1]

    @property
    def num_masked(self) -> int:
        return self.masked_idx.shape[1]

    def to(self, device) -> "MaskInfo":
        return MaskInfo(self.mask.to(device), self.visible_idx.to(device), self.masked_idx.to(device))
