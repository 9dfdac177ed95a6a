"""Probe data and schedule: repeated augmentation, warm-up in epochs, DataLoader workers, resume mid-epoch."""
import json
import os
from collections import Counter

import pytest
import torch
from torch.utils.data import Dataset

from ivfast.probes import classify
from ivfast.probes.config import ProbeConfig, load_probe_config
from ivfast.probes.loop import KeyBatches, make_loader, run_training, warmup_steps
from tests.probes.common import run_classify_killed
from tests.support import ROOT  # noqa: E402

CFG = os.path.join(ROOT, "configs", "probes")


def test_repeated_augmentation_batches():
    s = KeyBatches(6, 4, seed=3, repeats=2)
    assert len(s) == 3
    e0, e1 = s.batches(0), s.batches(1)
    for batches in (e0, e1):
        keys = [k for b in batches for k in b]
        assert Counter(i for i, _ in keys) == {i: 2 for i in range(6)}  # every sample twice per epoch
        assert len(set(seed for _, seed in keys)) == 12  # each copy its own augmentation draw
        for b in batches:  # [a, b, a, b]: copies apart, so cutmix's roll-by-one pairs different clips
            assert [i for i, _ in b[:2]] == [i for i, _ in b[2:]] and b[0][0] != b[1][0]
    assert {k for b in e0 for k in b}.isdisjoint({k for b in e1 for k in b})  # new draws each epoch
    s.set_position(1, 2)
    assert list(s) == e1[2:]
    plain = KeyBatches(5, 2, seed=0)
    assert [len(b) for b in plain.batches(0)] == [2, 2, 1]
    assert all(seed == 0 for b in KeyBatches(5, 2, 0, fixed_seed=0).batches(4) for _, seed in b)
    with pytest.raises(ValueError, match="not a multiple"):
        KeyBatches(6, 5, 0, repeats=2)


def test_classify_repeated_aug_epoch_length(tmp_path):
    cfg = load_probe_config("classify", os.path.join(CFG, "probe_classify_tiny.yaml"), [
        f"output_dir={tmp_path}", "progress=false", "max_steps=0", "epochs=1", "classify.synthetic_train=6",
        "classify.synthetic_val=4", "batch_size=4", "classify.repeated_aug=2", "classify.randaug=true"])
    out = classify.run(cfg)
    assert out["step"] == 3  # 6 clips x 2 copies / 4 per batch


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))


def _lrs(tmp_path, steps_per_epoch, **kw):
    cfg = ProbeConfig(output_dir=str(tmp_path), lr=1.0, min_lr=0.0, progress=False, **kw)
    head = _Head()

    def batches(epoch, start):
        yield from range(start, steps_per_epoch)

    run_training(cfg, head, batches, steps_per_epoch, lambda b: ((head.w ** 2).sum(), {}))
    lines = [json.loads(x) for x in open(os.path.join(tmp_path, "metrics.jsonl"))]
    return [x["lr"] for x in lines if "lr" in x]


def test_warmup_epochs_converted_with_steps_per_epoch(tmp_path):
    assert warmup_steps(ProbeConfig(warmup_epochs=1.5), 4) == 6
    assert warmup_steps(ProbeConfig(warmup_epochs=1.5, warmup_steps=2), 4) == 2
    lrs = _lrs(tmp_path / "a", 4, epochs=4, warmup_epochs=1.5)
    assert len(lrs) == 16
    assert lrs[:6] == pytest.approx([i / 6 for i in range(1, 7)])  # linear over 6 steps
    assert lrs[6] == pytest.approx(1.0) and lrs[7] < 1.0  # then the cosine starts
    assert _lrs(tmp_path / "b", 4, epochs=4)[0] == pytest.approx(1.0)  # no warm-up


class _Pids(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, key):
        return os.getpid(), key[0]


def _collate(items):
    return list(items)


def test_loader_workers_persist_across_epochs():
    sampler = KeyBatches(8, 4, seed=0)
    loader = make_loader(_Pids(), sampler, 2, _collate)
    pids, seen = [], []
    for epoch in range(2):
        sampler.set_position(epoch)
        got = [x for b in loader for x in b]
        pids.append({p for p, _ in got})
        seen.append(sorted(i for _, i in got))
    assert seen == [list(range(8))] * 2
    assert len(pids[0]) == 2 and os.getpid() not in pids[0] and pids[0] == pids[1]  # same 2 workers
    del loader


def test_classify_workers_and_resume_match_one_process(tmp_path, monkeypatch):
    common = ["progress=false", "max_steps=6", "save_every=3", "classify.cutmix_prob=0.0", "classify.randaug=true",
              "classify.repeated_aug=2", "classify.synthetic_train=8", "classify.synthetic_val=4", "batch_size=4",
              "lr=3e-3"]
    path = os.path.join(CFG, "probe_classify_tiny.yaml")
    ref = classify.run(load_probe_config("classify", path, [f"output_dir={tmp_path / 'ref'}", *common]))
    assert len(ref["losses"]) == 6  # 4 steps per epoch: crosses into epoch 1

    # A run that dies in its 5th step (checkpoint at step 3), resumed with 2 DataLoader workers:
    # it starts at the last batch of epoch 0 and reproduces the one-process run.
    out = str(tmp_path / "w2")
    run_classify_killed(monkeypatch, load_probe_config("classify", path, [f"output_dir={out}", *common]))
    assert json.load(open(os.path.join(out, "checkpoints", "state.json")))["step"] == 3
    rest = classify.run(load_probe_config("classify", path, [f"output_dir={out}", "num_workers=2", *common]))
    assert rest["step"] == 6 and rest["losses"] == pytest.approx(ref["losses"][3:], rel=1e-5)
    assert rest["eval"]["top1"] == pytest.approx(ref["eval"]["top1"])
