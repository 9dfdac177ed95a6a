"""Checkpoint atomicity, resume selection and loading without unpickling code."""
import json
import os

import pytest
import torch

from ivfast.training import checkpoint


class _FakeEngine:
    """Stands in for a DeepSpeed engine: writes a file per save, can die halfway."""

    def __init__(self, die=False):
        self.die = die

    def save_checkpoint(self, ckpt_dir, tag, save_latest):
        assert save_latest is False  # ivfast writes `latest` itself, atomically
        os.makedirs(os.path.join(ckpt_dir, tag), exist_ok=True)
        torch.save({"w": torch.ones(2)}, os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt"))
        if self.die:
            raise KeyboardInterrupt("killed during the save")


def _save(ckpt, step, keep=2, die=False):
    checkpoint.save(_FakeEngine(die), ckpt, step, {"step": step}, keep, True, lambda: None)


def test_save_writes_state_then_latest_and_prunes(tmp_path):
    ckpt = str(tmp_path)
    for step in (10, 20, 30):
        _save(ckpt, step)
    assert checkpoint.complete_tags(ckpt) == ["step_00000020", "step_00000030"]
    assert open(os.path.join(ckpt, "latest")).read() == "step_00000030"
    assert checkpoint.read_state(ckpt, "step_00000030") == {"step": 30}


def test_a_save_killed_midway_leaves_latest_on_a_complete_checkpoint(tmp_path):
    ckpt = str(tmp_path)
    _save(ckpt, 10)
    with pytest.raises(KeyboardInterrupt):
        _save(ckpt, 20, die=True)
    assert os.path.isdir(os.path.join(ckpt, "step_00000020"))  # partial files exist...
    assert open(os.path.join(ckpt, "latest")).read() == "step_00000010"  # ...but latest never names them
    assert checkpoint.find_resume(ckpt) == "step_00000010"
    _save(ckpt, 30)  # the next good save cleans the partial directory up
    assert not os.path.exists(os.path.join(ckpt, "step_00000020"))


def test_resume_skips_a_latest_that_names_an_incomplete_checkpoint(tmp_path):
    ckpt = str(tmp_path)
    _save(ckpt, 10)
    os.makedirs(os.path.join(ckpt, "step_00000020"))
    with open(os.path.join(ckpt, "latest"), "w") as f:
        f.write("step_00000020")  # e.g. written by another tool
    assert checkpoint.find_resume(ckpt) == "step_00000010"
    assert checkpoint.find_resume(str(tmp_path / "none")) is None


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > evil.txt",))


def test_safe_load_refuses_code_in_a_pickle(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"x": _Evil()}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        checkpoint.safe_load(path)
    assert not os.path.exists("evil.txt")
    good = str(tmp_path / "good.pt")
    torch.save({"w": torch.arange(3), "meta": {"step": 1}}, good)
    assert torch.equal(checkpoint.safe_load(good)["w"], torch.arange(3))


def test_state_file_is_json(tmp_path):
    _save(str(tmp_path), 5)
    with open(tmp_path / "step_00000005" / checkpoint.STATE_FILE) as f:
        assert json.load(f) == {"step": 5}
