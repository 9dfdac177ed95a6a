"""PhaseTracker logic with a fake statistics provider (no GPU needed)."""
import torch
import torch.nn as nn

from ivfast.training.phase_tracker import PhaseTracker, StatsProvider, phase


class FakeStats:
    """An allocator whose peak is set by the test: ``alloc(n)`` raises the current peak."""

    def __init__(self):
        self.cur = 0
        self.max = 0

    def alloc(self, n):
        self.cur += n
        self.max = max(self.max, self.cur)

    def free(self, n):
        self.cur -= n

    def provider(self):
        def reset():
            self.max = self.cur
        return StatsProvider(reset, lambda: self.max)


def test_phases_and_nesting_report_true_peaks():
    fake = FakeStats()
    tr = PhaseTracker(fake.provider(), active=True)
    fake.alloc(100)
    with tr.phase("forward"):
        fake.alloc(50)   # 150
        with tr.phase("teacher"):
            fake.alloc(400)  # 550
            fake.free(400)
        fake.alloc(10)   # 160
    with tr.phase("backward"):
        fake.alloc(30)  # 190
        fake.free(60)
    rec = tr.record()
    assert rec == {"mem_forward_mb": 550 / 2**20, "mem_teacher_mb": 550 / 2**20, "mem_backward_mb": 190 / 2**20}
    assert tr.record() == {}  # cleared


def test_inactive_and_absent_trackers_do_nothing():
    fake = FakeStats()
    tr = PhaseTracker(fake.provider(), active=False)
    with tr.phase("x"):
        fake.alloc(5)
    assert tr.record() == {}
    with phase(None, "x"):
        pass
    cpu = PhaseTracker.for_device(torch.device("cpu"))
    cpu.set_active(True)
    assert not cpu.active


def test_module_hooks_make_phases():
    fake = FakeStats()
    tr = PhaseTracker(fake.provider(), active=True)

    class Grow(nn.Module):
        def forward(self, x):
            fake.alloc(70)
            return x

    m = Grow()
    tr.watch(m, "encoder")
    with tr.phase("forward"):
        m(torch.zeros(1))
    assert tr.record()["mem_encoder_mb"] == 70 / 2**20
    tr.unwatch()
    m(torch.zeros(1))
    assert tr.record() == {}
