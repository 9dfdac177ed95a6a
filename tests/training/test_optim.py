"""Weight-decay groups and the warmup + cosine schedule."""
import math

import torch

from ivfast.training.optim import LRSchedule, param_groups


def test_schedule_warmup_then_cosine():
    s = LRSchedule(base_lr=1e-3, min_lr=1e-5, total_steps=110, warmup_steps=10)
    # The release's warmup: linspace(0, lr, warmup_steps), so 0 at step 0 and lr at step 9.
    assert s.lr(0) == 0.0 and math.isclose(s.lr(3), 1e-3 * 3 / 9) and math.isclose(s.lr(9), 1e-3)
    w = LRSchedule(base_lr=1e-3, min_lr=1e-5, total_steps=110, warmup_steps=10, warmup_lr=1e-4)
    assert w.lr(0) == 1e-4 and math.isclose(w.lr(3), 1e-4 + 9e-4 * 3 / 9) and math.isclose(w.lr(9), 1e-3)
    assert all(w.lr(i) == s.lr(i) for i in range(10, 120))
    assert math.isclose(s.lr(10), 1e-3)
    mid = 10 + 50
    assert math.isclose(s.lr(mid), 1e-5 + (1e-3 - 1e-5) * 0.5, rel_tol=1e-9)
    assert math.isclose(s.lr(110), 1e-5) and math.isclose(s.lr(500), 1e-5)
    lrs = [s.lr(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_no_warmup():
    s = LRSchedule(base_lr=1e-4, min_lr=0.0, total_steps=100, warmup_steps=0)
    assert s.lr(0) == 1e-4 and s.lr(100) == 0.0


def test_weight_decay_excludes_biases_norms_positions_tokens():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            self.norm = torch.nn.LayerNorm(4)
            self.pos_table = torch.nn.Parameter(torch.zeros(5, 4))
            self.mask_token = torch.nn.Parameter(torch.zeros(4))
            self.frozen = torch.nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

    m = M()
    groups = param_groups(m, 0.05, "all_tables")
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert decay == {id(m.fc.weight)}
    assert no_decay == {id(m.fc.bias), id(m.norm.weight), id(m.norm.bias), id(m.pos_table), id(m.mask_token)}
