"""Helpers shared by the probe tests."""
import pytest

from ivfast.probes import classify


def run_classify_killed(monkeypatch, cfg, at_call: int = 5) -> None:
    """``classify.run(cfg)`` dying in its ``at_call``-th loss call (a crash mid-run, after the
    checkpoints written before it); the loss is restored afterwards."""
    calls = {"n": 0}
    real = classify.soft_cross_entropy

    def dying(logits, target):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise RuntimeError("killed")
        return real(logits, target)

    monkeypatch.setattr(classify, "soft_cross_entropy", dying)
    with pytest.raises(RuntimeError, match="killed"):
        classify.run(cfg)
    monkeypatch.setattr(classify, "soft_cross_entropy", real)
