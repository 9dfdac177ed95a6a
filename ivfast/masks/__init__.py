"""Token masks, drawn per clip from per-sample generators: Stage 1's semantic and tube masks,
Stage 2's multi-block views."""
from ivfast.masks.base import MaskInfo, num_reconstructed
from ivfast.masks.frame import num_visible_per_frame, semantic_mask, tube_mask
from ivfast.masks.multiblock import multiblock_masks

__all__ = ["MaskInfo", "multiblock_masks", "num_reconstructed", "num_visible_per_frame", "semantic_mask",
           "tube_mask"]
