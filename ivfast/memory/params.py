"""Exact parameter counts per component, from the real modules built on the ``meta`` device.

Nothing is allocated: :func:`count_params` instantiates ``Stage1Model`` and ``SigLIPTeacher``
from the config under ``torch.device("meta")`` and sums ``numel`` per top-level part.
Trainable parts are the student's (optimised by DeepSpeed); the teacher is frozen.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ivfast.config import Config, stage1_config
from ivfast.models.layers import count_parameters

# Student attribute -> component name in the report.
_COMPONENTS = {
    "encoder": "encoder",
    "align_pos": "align heads",
    "align_heads": "align heads",
    "pool": "pool + final head",
    "final_head": "pool + final head",
    "mask_token": "predictor",
    "predictor_pos": "predictor",
    "predictor": "predictor",
    "recon_head": "linear head",
    "diffloss": "diffusion head",
}


@dataclass
class ParamCounts:
    """Scalar parameter counts: ``trainable`` per component, ``teacher`` frozen."""

    trainable: dict[str, int] = field(default_factory=dict)
    teacher: int = 0

    @property
    def total_trainable(self) -> int:
        return sum(self.trainable.values())


def _meta_build(cfg: Config):
    from ivfast.models.stage1 import Stage1Model
    from ivfast.models.teacher import SigLIPTeacher, teacher_return_layers

    m, t = cfg.model, cfg.model.teacher
    with torch.device("meta"):
        student = Stage1Model(stage1_config(cfg))
        teacher = SigLIPTeacher.from_config(t, teacher_return_layers(t.depth, m.align.num_layers, t.layer_interval))
    return student, teacher


def count_params(cfg: Config) -> ParamCounts:
    """Per-component counts of the Stage-1 student (all trainable) and the frozen teacher."""
    student, teacher = _meta_build(cfg)
    counts = ParamCounts(teacher=count_parameters(teacher))
    seen = set()
    for name, child in student.named_children():
        comp = _COMPONENTS.get(name)
        if comp is None:
            raise KeyError(f"memory model: no component for Stage1Model.{name}")
        n = count_parameters(child)
        counts.trainable[comp] = counts.trainable.get(comp, 0) + n
        seen.update(id(p) for p in child.parameters())
    for name, prm in student.named_parameters(recurse=False):
        comp = _COMPONENTS.get(name)
        if comp is None:
            raise KeyError(f"memory model: no component for Stage1Model.{name}")
        counts.trainable[comp] = counts.trainable.get(comp, 0) + prm.numel()
    return counts
