"""Pieces of the training loop that need no process group."""
from types import SimpleNamespace

import pytest
import torch


def test_metrics_record_has_the_data_share():
    from ivfast.training.trainer import _StepAccumulator

    engine = SimpleNamespace(optimizer=SimpleNamespace(param_groups=[{"lr": 0.1}]))
    state = {"step": 3, "epoch": 0, "skipped_steps": 0, "bad_videos": 2}
    acc = _StepAccumulator()
    acc.data_time = 0.5
    acc.add({"clips": 4, "losses": {"loss": 1.0}})
    rec = acc.record(state, 2.0, engine, torch.device("cpu"))
    assert rec["data_share"] == pytest.approx(0.25) and rec["bad_videos"] == 2
    assert acc.record(state, 0.0, engine, torch.device("cpu"))["data_share"] is None
