"""``model.init_from``: a run's encoder starts from an export directory (the Hugging Face layout of
``ivfast-export``), after the init scheme and before training; an architecture mismatch stops the
step before anything runs."""
import os

import pytest
import torch

from ivfast.config import load_config
from ivfast.models.pretrained import PretrainedError, save_pretrained
from ivfast.training.step import build_step
from tests.support import ROOT

TINY = os.path.join(ROOT, "configs", "tiny.yaml")
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _export_of_fresh_step(tmp_path, seed: int):
    torch.manual_seed(seed)
    step = build_step(load_config(TINY))
    out = tmp_path / "exported"
    save_pretrained(step.model.encoder, str(out), {"mean": MEAN, "std": STD, "source": {"kind": "test"}})
    return step.model.encoder.state_dict(), str(out)


def test_stage1_encoder_starts_from_the_export(tmp_path):
    exported, out = _export_of_fresh_step(tmp_path, seed=1)
    torch.manual_seed(2)  # a different init: every encoder tensor must come from the export
    step = build_step(load_config(TINY, [f"model.init_from={out}"]))
    got = step.model.encoder.state_dict()
    assert got.keys() == exported.keys()
    for k, v in exported.items():
        assert torch.equal(got[k], v), k
    torch.manual_seed(2)  # without init_from the same seed gives other weights: the load did the work
    plain = build_step(load_config(TINY)).model.encoder.state_dict()
    assert not torch.equal(plain["blocks.0.attn.qkv.weight"], exported["blocks.0.attn.qkv.weight"])


def test_an_export_of_another_architecture_stops_the_step(tmp_path):
    _, out = _export_of_fresh_step(tmp_path, seed=1)
    cfg = load_config(TINY, [f"model.init_from={out}", "model.encoder.gelu=erf"])
    with pytest.raises(PretrainedError, match="gelu"):
        build_step(cfg)
