"""The benchmark scripts run (at tiny sizes on the CPU), so they are ready for a GPU."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_profile_step_runs_on_the_tiny_config(capsys):
    from benchmarks.profile_step import main

    assert main(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "aten::" in out and " ms " in out
