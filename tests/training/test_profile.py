"""train.profile: a chrome trace of the chosen steps; memory snapshots (CUDA's functions injected here)."""
import json
import os

import pytest
import torch

from ivfast.training.profiling import StepProfiler
from tests.training.watched_run import PROFILED, watched_run


def test_a_profiled_run_writes_a_chrome_trace_of_its_step():
    folder = os.path.join(watched_run(), "profile")
    assert sorted(os.listdir(folder)) == [f"trace_rank0_steps{PROFILED}-{PROFILED}.json"]  # no snapshot on the CPU
    with open(os.path.join(folder, f"trace_rank0_steps{PROFILED}-{PROFILED}.json")) as f:
        events = json.load(f)["traceEvents"]
    names = {e.get("name") for e in events}
    assert f"step {PROFILED}" in names and f"step {PROFILED - 1}" not in names
    assert {"aten::addmm", "aten::mm"} & names and "aten::native_layer_norm" in names  # the step's ops
    assert any(n and n.endswith("_backward") or n and "Backward" in n for n in names)


class _Memory:
    def __init__(self):
        self.calls = []

    def history(self, on):
        self.calls.append(("history", on))

    def dump(self, path):
        self.calls.append(("dump", os.path.basename(path)))
        with open(path, "wb") as f:
            f.write(b"snapshot")


def test_the_window_records_memory_and_an_oom_writes_a_snapshot_then_raises(tmp_path):
    mem = _Memory()
    prof = StepProfiler(str(tmp_path), [2, 2], torch.device("cpu"), rank=1, history=mem.history, dump=mem.dump)
    x = torch.randn(16, 16)
    for step in range(1, 5):
        prof.begin(step)
        with prof.step_range(step), prof.guard(step):
            (x @ x).sum()
        prof.end(step)
    assert mem.calls == [("history", True), ("dump", "memory_rank1_steps2-3.pickle"), ("history", False)]
    trace = tmp_path / "profile" / "trace_rank1_steps2-3.json"
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"step 2", "step 3", "aten::mm"} <= names and "step 4" not in names
    with pytest.raises(torch.OutOfMemoryError):
        with prof.guard(7):
            raise torch.OutOfMemoryError("CUDA out of memory (a test)")
    assert mem.calls[-1] == ("dump", "oom_rank1_step7.pickle")
    assert (tmp_path / "profile" / "oom_rank1_step7.pickle").read_bytes() == b"snapshot"


def test_a_run_that_ends_inside_the_window_still_writes_it_and_cpu_has_no_snapshot(tmp_path):
    prof = StepProfiler(str(tmp_path), [1, 5], torch.device("cpu"))
    prof.begin(1)
    with prof.step_range(1):
        torch.ones(3).sum()
    prof.end(1)
    prof.close()
    assert os.listdir(tmp_path / "profile") == ["trace_rank0_steps1-1.json"]
    with pytest.raises(torch.OutOfMemoryError):  # no CUDA: nothing to snapshot, the error goes on
        with prof.guard(2):
            raise torch.OutOfMemoryError("x")
    assert os.listdir(tmp_path / "profile") == ["trace_rank0_steps1-1.json"]
